"""Weighted averaging of named tensors (FedAvg), accumulated in float64."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = dict[str, torch.Tensor]


def weighted_mean(items: Sequence[tuple[Tensors, float]]) -> Tensors:
    """``sum_k w_k * T_k / sum_k w_k`` for every tensor name; all items must share names."""
    if not items:
        raise ValueError("weighted_mean of no updates")
    total = float(sum(w for _, w in items))
    if total <= 0:
        raise ValueError("weighted_mean: weights sum to zero")
    names = set(items[0][0])
    for tensors, _ in items[1:]:
        if set(tensors) != names:
            raise ValueError("weighted_mean: updates carry different tensor names")
    out: Tensors = {}
    for name, first in items[0][0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for tensors, w in items:
            acc += tensors[name].to(torch.float64) * (w / total)
        out[name] = acc.to(first.dtype)
    return out
