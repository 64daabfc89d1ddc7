"""Robust aggregation rules over client update *deltas* (``aggregate.rule``).

``median``, ``trimmed_mean``, ``krum`` and ``multi_krum`` are Flower's NumPy implementations
(``flwr.server.strategy.aggregate``); this module only flattens fedblend's named tensors into
their array lists and back, and adds per-update norm clipping (``aggregate.clip_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedblend.comm.codec import State

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")


def norm(delta: State) -> float:
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for n in delta.values() for t in n.values()))


def clip(delta: State, max_norm: float) -> tuple[State, float]:
    """``delta`` scaled to L2 norm <= ``max_norm`` (over all its tensors), and its norm before."""
    n = norm(delta)
    if max_norm <= 0 or n <= max_norm:
        return delta, n
    f = max_norm / n
    return {r: {k: (t.to(torch.float64) * f).to(t.dtype) for k, t in named.items()} for r, named in delta.items()}, n


def _keys(delta: State) -> list[tuple[str, str]]:
    return [(r, k) for r in sorted(delta) for k in sorted(delta[r])]


def aggregate_deltas(
    rule: str, deltas: Sequence[tuple[State, float]], trim_ratio: float = 0.2, krum_f: int = 1
) -> State:
    """One delta from many (each with its example count): weighted mean for ``fedavg``,
    Flower's coordinate-wise median / trimmed mean, Krum (the single most central update)
    or Multi-Krum (weighted mean of the ``n - f`` most central)."""
    from flwr.server.strategy import aggregate as flwr_agg

    if not deltas:
        raise ValueError("no updates to aggregate")
    keys = _keys(deltas[0][0])
    arrays = [([d[r][k].detach().to(torch.float64).numpy() for r, k in keys], w) for d, w in deltas]
    if rule == "fedavg":
        out = flwr_agg.aggregate([(a, w) for a, w in arrays]) if any(w > 0 for _, w in arrays) else None
        if out is None:
            raise ValueError("fedavg: weights sum to zero")
    elif rule == "median":
        out = flwr_agg.aggregate_median(arrays)
    elif rule == "trimmed_mean":
        out = flwr_agg.aggregate_trimmed_avg(arrays, trim_ratio)
    elif rule == "krum":
        out = flwr_agg.aggregate_krum(arrays, krum_f, 0)
    elif rule == "multi_krum":
        out = flwr_agg.aggregate_krum(arrays, krum_f, max(1, len(arrays) - krum_f))
    else:
        raise ValueError(f"unknown aggregation rule {rule!r}")
    first = deltas[0][0]
    res: State = {}
    for (r, k), a in zip(keys, out, strict=True):
        res.setdefault(r, {})[k] = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(first[r][k].dtype)
    return res
