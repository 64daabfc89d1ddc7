"""The low-rank maths of the heterogeneous-rank methods (METHODS.md part 2, sections 4 and 5),
on PEFT-named adapter tensors, in torch only (no trainer).

Conventions (METHODS.md part 2): per adapted layer A_i is ``r_i x d_in`` (``...lora_A.weight``),
B_i is ``d_out x r_i`` (``...lora_B.weight``), the update is ``s_i B_i A_i``; a layer is the
module prefix before ``.lora_A.`` / ``.lora_B.``. DoRA magnitude vectors
(``...lora_magnitude_vector...``, 1-D, rank-independent) are averaged with the example weights
(section 8).

FlexLoRA (section 4): ``dW_g = sum_i p_i s_i B_i A_i`` by the exact cheap route
(:func:`flexlora_svd`), then per client ``A_i = V[:, :r_i]^T``, ``B_i = U[:, :r_i] diag(sigma)
/ s_i`` (:func:`svd_factors`), zero-padded where ``r_i`` exceeds the rank of ``dW_g``.

HetLoRA (section 5): truncation, zero padding to ``r_max``, per-layer sparsity weights
``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F`` (:func:`hetlora_aggregate`; rank slots no
participant covers keep the previous global value), the rank penalty
:func:`hetlora_penalty` and the self-pruning rule :func:`prune_rank`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]
A, B, M = "lora_A", "lora_B", "lora_magnitude_vector"


def layer_of(key: str) -> tuple[str, str | None]:
    """``(module prefix, kind)`` of a PEFT adapter tensor name; kind is ``lora_A``, ``lora_B``,
    ``lora_magnitude_vector`` or None (a tensor of no LoRA layer)."""
    for kind in (A, B, M):
        tag = f".{kind}"
        i = key.find(tag + ".")
        if i < 0 and key.endswith(tag):
            i = len(key) - len(tag)
        if i >= 0:
            return key[:i], kind
    return key, None


def layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """``{prefix: {kind: key}}`` of every adapted layer (kinds A, B and, with DoRA, M)."""
    out: dict[str, dict[str, str]] = {}
    for key in tensors:
        prefix, kind = layer_of(key)
        if kind is not None:
            out.setdefault(prefix, {})[kind] = key
    for prefix, kinds in out.items():
        if (A in kinds) != (B in kinds):
            raise ValueError(f"{prefix}: a LoRA layer needs both lora_A and lora_B")
    return out


def weighted_vectors(items: Sequence[tuple[Mapping[str, torch.Tensor], float]], keys: Sequence[str]) -> Tensors:
    """The example-weighted mean of the named tensors (DoRA magnitudes: section 8)."""
    total = float(sum(w for _, w in items))
    out: Tensors = {}
    for k in keys:
        first = items[0][0][k]
        acc = torch.zeros_like(first, dtype=torch.float64)
        for tensors, w in items:
            acc += tensors[k].to(torch.float64) * (w / total)
        out[k] = acc.to(first.dtype)
    return out


# ---- FlexLoRA --------------------------------------------------------------------------------
def flexlora_svd(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``U diag(S) Vh`` of ``dW = sum_i c_i B_i A_i`` (``factors``: ``(B_i, A_i,
    c_i)``, ``c_i = p_i s_i``), exactly, without forming the dense ``d_out x d_in`` matrix:
    ``dW = P Q`` with ``P = [c_1 B_1, ...]`` (``d_out x R``), ``Q = [A_1; ...]`` (``R x d_in``);
    ``P = Q_p R_p``, ``Q^T = Q_q R_q``; the SVD of the small core ``R_p R_q^T`` rotates into
    the bases. Float64 throughout; ``len(S) = min(d_out, d_in, R)``."""
    p = torch.cat([b.to(torch.float64) * c for b, _, c in factors], dim=1)
    q = torch.cat([a.to(torch.float64) for _, a, _ in factors], dim=0)
    qp, rp = torch.linalg.qr(p)  # d_out x k1, k1 x R
    qq, rq = torch.linalg.qr(q.T)  # d_in x k2, k2 x R
    uc, s, vhc = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ uc, s, vhc @ qq.T


def svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``r`` LoRA factors of ``U diag(S) Vh`` at scaling ``scale``: ``B = U[:, :r]
    diag(S[:r]) / scale``, ``A = Vh[:r]`` (``scale * B @ A`` is the best rank-``r``
    approximation, Eckart-Young); zero columns / rows beyond the available rank."""
    k = min(r, s.numel())
    b = u[:, :k] * (s[:k] / scale)
    a = vh[:k]
    if k < r:
        b = torch.cat([b, b.new_zeros(b.shape[0], r - k)], 1)
        a = torch.cat([a, a.new_zeros(r - k, a.shape[1])], 0)
    return b, a


def flexlora_aggregate(updates: Sequence[tuple[Mapping[str, torch.Tensor], float, float]], r: int, scale: float,
                       ) -> tuple[Tensors, dict[str, float]]:
    """FlexLoRA's server step on whole adapters: ``updates`` are ``(tensors_i, p_i, s_i)`` with
    each client's own rank; returns the rank-``r`` truncation of ``dW_g = sum p_i s_i B_i A_i``
    at scaling ``scale`` (A, B in the dtype received; DoRA magnitudes averaged with ``p_i``), and
    the share of ``||dW_g||_F^2`` the truncation keeps (min over layers; 1.0 = exact)."""
    first = updates[0][0]
    out: Tensors = {}
    kept = 1.0
    for _prefix, kinds in sorted(layers(first).items()):
        if A in kinds:
            ka, kb = kinds[A], kinds[B]
            u, s, vh = flexlora_svd([(t[kb], t[ka], p * si) for t, p, si in updates])
            b, a = svd_factors(u, s, vh, r, scale)
            out[kb], out[ka] = b.to(first[kb].dtype), a.to(first[ka].dtype)
            energy = float((s * s).sum())
            if energy > 0:
                kept = min(kept, float((s[:r] * s[:r]).sum()) / energy)
        if M in kinds:
            out.update(weighted_vectors([(t, p) for t, p, _ in updates], [kinds[M]]))
    for k, t in first.items():  # tensors of no LoRA layer travel as they are
        out.setdefault(k, t)
    return out, {"energy_kept": kept}


def client_factors(tensors: Mapping[str, torch.Tensor], r: int, ratio: float) -> Tensors:
    """The first ``r`` rank components of an adapter, with B multiplied by ``ratio`` (FlexLoRA:
    ``s_server / s_i``, so ``s_i B_i A_i`` is the server's rank-``r`` truncation)."""
    out: Tensors = {}
    for k, t in tensors.items():
        kind = layer_of(k)[1]
        if kind == A:
            out[k] = t[:r].clone()
        elif kind == B:
            out[k] = (t[:, :r] * ratio).to(t.dtype)
        else:
            out[k] = t
    return out


# ---- HetLoRA ---------------------------------------------------------------------------------
def rescale(tensors: Mapping[str, torch.Tensor], ratio: float) -> Tensors:
    """Both factors multiplied by ``sqrt(ratio)``: the adapter at scaling ``s`` as one at
    ``s / ratio`` with the same update (METHODS 5(e), the ``handle_alpha`` route)."""
    if ratio == 1.0:
        return dict(tensors)
    f = math.sqrt(ratio)
    return {k: (t * f).to(t.dtype) if layer_of(k)[1] in (A, B) else t for k, t in tensors.items()}


def hetlora_aggregate(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float]], previous: Mapping[str, torch.Tensor],
    scale: float, example_weights: Sequence[float] | None = None,
) -> tuple[Tensors, dict[str, list[float]]]:
    """HetLoRA's aggregation: ``updates`` are ``(tensors_k, s_k)`` at each client's own rank
    r_k, ``previous`` the global adapter (rank r_max, scaling ``scale``). Per layer:
    ``S_k = ||s_k B_k A_k||_F``, ``w_k = S_k / sum_j S_j`` (equal weights where every S_k is
    0), ``B_g = sum_k w_k pad(B_k)``, ``A_g = sum_k w_k pad(A_k)`` after each client's factors are
    brought to scaling ``scale`` (both times ``sqrt(s_k / scale)``); the rank slots at or beyond
    every participant's rank keep ``previous``. DoRA magnitudes: the mean weighted by
    ``example_weights`` (default equal). Returns the new global and the weights per layer."""
    ex = list(example_weights) if example_weights is not None else [1.0] * len(updates)
    out: Tensors = {}
    weights: dict[str, list[float]] = {}
    for prefix, kinds in sorted(layers(previous).items()):
        if A in kinds:
            ka, kb = kinds[A], kinds[B]
            g_a, g_b = previous[ka], previous[kb]
            r_max = g_a.shape[0]
            norms = [float(torch.linalg.matrix_norm(sk * (t[kb].to(torch.float64) @ t[ka].to(torch.float64))))
                     for t, sk in updates]
            total = sum(norms)
            w = [n / total for n in norms] if total > 0 else [1.0 / len(norms)] * len(norms)
            weights[prefix] = w
            acc_a = torch.zeros(g_a.shape, dtype=torch.float64)
            acc_b = torch.zeros(g_b.shape, dtype=torch.float64)
            covered = 0
            for (t, sk), wk in zip(updates, w, strict=True):
                f = math.sqrt(sk / scale)
                rk = t[ka].shape[0]
                if rk > r_max:
                    raise ValueError(f"{prefix}: rank {rk} above the server's {r_max}")
                acc_a[:rk] += wk * f * t[ka].to(torch.float64)
                acc_b[:, :rk] += wk * f * t[kb].to(torch.float64)
                covered = max(covered, rk)
            acc_a[covered:] = g_a[covered:].to(torch.float64)
            acc_b[:, covered:] = g_b[:, covered:].to(torch.float64)
            out[ka], out[kb] = acc_a.to(g_a.dtype), acc_b.to(g_b.dtype)
        if M in kinds:
            out.update(weighted_vectors([(t, e) for (t, _), e in zip(updates, ex, strict=True)], [kinds[M]]))
    for k, t in previous.items():
        out.setdefault(k, t)
    return out, weights


def tail_norm_product(tensors: Mapping[str, torch.Tensor], r: int, gamma: float) -> torch.Tensor:
    """``sum over layers ||B[:, q:r]||_F ||A[q:r, :]||_F`` with ``q = floor(gamma r)``: the
    norm product HetLoRA penalises and whose fall triggers pruning (differentiable; rank
    components beyond ``r``, a zero-padded adapter's padding, are left out)."""
    q = math.floor(gamma * r)
    total: torch.Tensor | None = None
    for _prefix, kinds in sorted(layers(tensors).items()):
        if A not in kinds:
            continue
        a, b = tensors[kinds[A]], tensors[kinds[B]]
        term = torch.linalg.vector_norm(b[:, q:r]) * torch.linalg.vector_norm(a[q:r, :])
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros(())


def hetlora_penalty(tensors: Mapping[str, torch.Tensor], r: int, gamma: float, lam: float) -> torch.Tensor:
    """HetLoRA's regulariser ``lam * sum_layers ||B[:, floor(gamma r):]||_F ||A[floor(gamma r):, :]||_F``."""
    return lam * tail_norm_product(tensors, r, gamma)


def prune_rank(r: int, gamma: float, r_min: int, before: float, after: float) -> int:
    """HetLoRA's self-pruning: ``max(r_min, floor(gamma r))`` when the tail norm product fell
    during local training (``after < before``), else ``r``. Ranks only shrink."""
    if after < before:
        return min(r, max(r_min, math.floor(gamma * r)))
    return r
