"""Exact aggregation of LoRA factors (pure torch): FLoRA's stacking and FedEx-LoRA's residual.

Conventions (``../shared/docs/METHODS.md`` part 2): per adapted layer ``A_i`` is ``r_i x d_in``,
``B_i`` is ``d_out x r_i``, client ``i`` applies ``s_i B_i A_i`` and weighs
``p_i = n_i / sum_j n_j``. Adapter tensors carry PEFT key names; a layer is the module prefix
before ``.lora_A.`` / ``.lora_B.``. Tensors other than A and B (e.g. DoRA's magnitude vector)
are not part of a layer's product: :func:`weighted_other` averages them.

A base-weight *increment* is a dict of tensors: per layer either factored,
``{prefix}.lora_B.weight`` (``d_out x R``) and ``{prefix}.lora_A.weight`` (``R x d_in``) with
the increment ``B @ A``, or dense, ``{prefix}`` (``d_out x d_in``, nn.Linear layout whatever the
base layer stores). Every scaling is already folded in, so an increment is self-contained.
:func:`choose` picks, per layer, the form with fewer numbers. Products and sums run in float64
and are returned in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]
A_TAG, B_TAG = ".lora_A.", ".lora_B."


def split_layer(key: str) -> tuple[str, str] | None:
    """``(prefix, "A" | "B")`` of a PEFT LoRA key, None for other tensors."""
    for tag, kind in ((A_TAG, "A"), (B_TAG, "B")):
        if tag in key:
            return key.split(tag, 1)[0], kind
    return None


def a_key(prefix: str) -> str:
    return f"{prefix}{A_TAG}weight"


def b_key(prefix: str) -> str:
    return f"{prefix}{B_TAG}weight"


def layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefix: (A, B)}`` of one adapter's tensors (every layer must have both)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        hit = split_layer(k)
        if hit is not None:
            parts.setdefault(hit[0], {})[hit[1]] = t
    out = {}
    for prefix, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {prefix}: needs both lora_A and lora_B")
        out[prefix] = (ab["A"], ab["B"])
    return out


def weights(counts: Sequence[float]) -> list[float]:
    """``p_i = n_i / sum_j n_j``."""
    total = float(sum(counts))
    if not counts or total <= 0:
        raise ValueError("exact aggregation: no examples to weigh")
    return [float(n) / total for n in counts]


def weighted_other(adapters: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[float]) -> Tensors:
    """The example-weighted mean of every tensor that is neither a LoRA A nor B."""
    p = weights(counts)
    out: Tensors = {}
    for k, first in adapters[0].items():
        if split_layer(k) is None:
            acc = sum(pi * a[k].to(torch.float64) for pi, a in zip(p, adapters, strict=True))
            out[k] = acc.to(first.dtype)  # type: ignore[union-attr]
    return out


# ---- FLoRA ------------------------------------------------------------------------------------
def flora_stack(
    adapters: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[float], scalings: Sequence[float],
    s_g: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """FLoRA's stacked adapter ``{prefix: (A_g, B_g)}``: ``A_g = [p_1 (s_1/s_g) A_1; ...]``
    (``R x d_in``, R the sum of the received ranks), ``B_g = [B_1, ..., B_K]``, so that
    ``s_g B_g A_g = sum_k p_k s_k B_k A_k`` exactly, whatever each client's rank and scaling."""
    p = weights(counts)
    per = [layers(a) for a in adapters]
    names = set(per[0])
    if any(set(x) != names for x in per[1:]):
        raise ValueError("flora: the clients' adapters name different layers")
    out = {}
    for prefix in sorted(names):
        a_rows = [(pk * sk / s_g) * x[prefix][0].to(torch.float64)
                  for pk, sk, x in zip(p, scalings, per, strict=True)]
        b_cols = [x[prefix][1].to(torch.float64) for x in per]
        dtype = per[0][prefix][0].dtype
        out[prefix] = (torch.cat(a_rows, 0).to(dtype), torch.cat(b_cols, 1).to(dtype))
    return out


# ---- FedEx-LoRA -------------------------------------------------------------------------------
def fedex(
    adapters: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[float],
) -> tuple[Tensors, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """FedEx-LoRA's new global adapter and residual: ``A_bar = sum p_i A_i``,
    ``B_bar = sum p_i B_i`` (as PEFT-keyed tensors, other tensors weighted likewise), and per
    layer the residual ``R = sum p_i B_i A_i - B_bar A_bar`` in factored form
    ``(F_B, F_A) = ([B_1 .. B_k, B_bar], [p_1 A_1; ...; p_k A_k; -A_bar])`` with ``R = F_B F_A``.
    With the clients' common scaling s: ``s B_bar A_bar + s R = sum p_i s B_i A_i``."""
    p = weights(counts)
    per = [layers(a) for a in adapters]
    mean: Tensors = weighted_other(adapters, counts)
    residual = {}
    for prefix in sorted(per[0]):
        a64 = [x[prefix][0].to(torch.float64) for x in per]
        b64 = [x[prefix][1].to(torch.float64) for x in per]
        if len({t.shape for t in a64}) != 1 or len({t.shape for t in b64}) != 1:
            raise ValueError(f"fedex_lora: layer {prefix}: clients' ranks differ")
        a_bar = sum(pi * a for pi, a in zip(p, a64, strict=True))
        b_bar = sum(pi * b for pi, b in zip(p, b64, strict=True))
        dtype = per[0][prefix][0].dtype
        mean[a_key(prefix)], mean[b_key(prefix)] = a_bar.to(dtype), b_bar.to(dtype)  # type: ignore[union-attr]
        f_b = torch.cat([*b64, b_bar], 1)  # type: ignore[list-item]
        f_a = torch.cat([*(pi * a for pi, a in zip(p, a64, strict=True)), -a_bar], 0)  # type: ignore[list-item]
        residual[prefix] = (f_a.to(dtype), f_b.to(dtype))
    return mean, residual


# ---- increments: factored or dense ------------------------------------------------------------
def choose(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0,
           mode: str = "auto") -> Tensors:
    """The increment ``scale * B @ A`` per layer (``factors``: ``{prefix: (A, B)}``), factored
    (the scale folded into A) or dense, whichever has fewer numbers (``mode="auto"``; a tie goes
    dense), or as ``mode`` ("factored" | "dense") says."""
    if mode not in ("auto", "factored", "dense"):
        raise ValueError(f"unknown increment form {mode!r}")
    out: Tensors = {}
    for prefix, (a, b) in factors.items():
        factored = a.numel() + b.numel()
        dense = b.shape[0] * a.shape[1]
        if mode == "factored" or (mode == "auto" and factored < dense):
            out[a_key(prefix)] = (a.to(torch.float64) * scale).to(a.dtype)
            out[b_key(prefix)] = b.clone()
        else:
            out[prefix] = (scale * (b.to(torch.float64) @ a.to(torch.float64))).to(a.dtype)
    return out


def dense(increment: Mapping[str, torch.Tensor]) -> Tensors:
    """``{prefix: d_out x d_in}``: every layer of an increment (factored or dense) as a matrix."""
    out: Tensors = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in increment.items():
        hit = split_layer(k)
        if hit is None:
            out[k] = t
        else:
            parts.setdefault(hit[0], {})[hit[1]] = t
    for prefix, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"increment layer {prefix}: needs both lora_A and lora_B")
        out[prefix] = (ab["B"].to(torch.float64) @ ab["A"].to(torch.float64)).to(ab["A"].dtype)
    return out


def add(total: Mapping[str, torch.Tensor], increment: Mapping[str, torch.Tensor]) -> Tensors:
    """``total + increment`` per layer (dense; a layer missing on one side counts as zero)."""
    out = {k: t.clone() for k, t in total.items()}
    for k, d in dense(increment).items():
        out[k] = (out[k].to(torch.float64) + d.to(torch.float64)).to(d.dtype) if k in out else d.clone()
    return out


def numbers(increment: Mapping[str, torch.Tensor]) -> int:
    """How many numbers an increment sends."""
    return sum(t.numel() for t in increment.values())
