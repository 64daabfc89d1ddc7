"""FLoRA's stacking and FedEx-LoRA's residual on hand-built tensors: the aggregate equals the
example-weighted mean of the clients' s_i B_i A_i (METHODS.md part 2, sections 3 and 6)."""

from __future__ import annotations

import torch

from fedblend.aggregation import exact

P = "base_model.model.layers.0.q_proj"  # one adapted layer, PEFT key names
Q = "base_model.model.layers.0.v_proj"


def _adapter(g: torch.Generator, r: int, d_in: int = 6, d_out: int = 5) -> dict[str, torch.Tensor]:
    out = {}
    for prefix in (P, Q):
        out[exact.a_key(prefix)] = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        out[exact.b_key(prefix)] = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return out


def _target(adapters, counts, scalings) -> dict[str, torch.Tensor]:
    """sum_i p_i s_i B_i A_i per layer, written out by hand."""
    total = sum(counts)
    return {prefix: sum((n / total) * s * a[exact.b_key(prefix)] @ a[exact.a_key(prefix)]
                        for a, n, s in zip(adapters, counts, scalings, strict=True))
            for prefix in (P, Q)}


def test_a_2x2_example_by_hand() -> None:
    # two rank-1 clients on a 2x2 layer, n = (1, 3): p = (1/4, 3/4), s = (2, 1)
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [2.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[4.0], [0.0]])
    c1 = {exact.a_key(P): a1, exact.b_key(P): b1}
    c2 = {exact.a_key(P): a2, exact.b_key(P): b2}
    want = torch.tensor([[0.5, 3.0], [1.0, 0.0]])  # 1/4*2*[[1,0],[2,0]] + 3/4*1*[[0,4],[0,0]]
    (a_g, b_g), = exact.flora_stack([c1, c2], [1, 3], [2.0, 1.0], s_g=1.0).values()
    assert torch.equal(a_g, torch.tensor([[0.5, 0.0], [0.0, 0.75]]))
    assert torch.equal(b_g, torch.tensor([[1.0, 4.0], [2.0, 0.0]]))
    assert torch.allclose(b_g @ a_g, want)
    # FedEx (one scaling, s = 1): A_bar = [1/4, 3/4], B_bar = [3.25, 0.5]^T
    mean, res = exact.fedex([c1, c2], [1, 3])
    assert torch.allclose(mean[exact.a_key(P)], torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(mean[exact.b_key(P)], torch.tensor([[3.25], [0.5]]))
    f_a, f_b = res[P]
    m = 0.25 * b1 @ a1 + 0.75 * b2 @ a2
    assert torch.allclose(f_b @ f_a, m - mean[exact.b_key(P)] @ mean[exact.a_key(P)])
    assert torch.allclose(mean[exact.b_key(P)] @ mean[exact.a_key(P)] + f_b @ f_a, m)


def test_flora_stack_is_the_weighted_mean_for_mixed_ranks_and_scalings() -> None:
    g = torch.Generator().manual_seed(0)
    ranks, counts, scalings = [4, 2, 1], [10, 30, 5], [2.0, 4.0, 8.0]  # alpha_i = 8, s_i = 8 / r_i
    adapters = [_adapter(g, r) for r in ranks]
    s_g = 8.0 / sum(ranks)
    stack = exact.flora_stack(adapters, counts, scalings, s_g)
    want = _target(adapters, counts, scalings)
    for prefix, (a_g, b_g) in stack.items():
        assert a_g.shape == (sum(ranks), 6) and b_g.shape == (5, sum(ranks))  # R from the tensors
        assert torch.allclose(s_g * b_g @ a_g, want[prefix], rtol=1e-12, atol=1e-12)
    # sent as an increment: dense here (R(d_in + d_out) = 77 > 30 numbers), or factored on demand
    for mode in ("auto", "factored", "dense"):
        inc = exact.choose(stack, s_g, mode)
        d = exact.dense(inc)
        assert all(torch.allclose(d[p], want[p], rtol=1e-12, atol=1e-12) for p in (P, Q))
    assert set(exact.choose(stack, s_g)) == {P, Q}


def test_fedex_aggregate_plus_residual_is_the_weighted_mean() -> None:
    g = torch.Generator().manual_seed(1)
    counts, s = [3, 7, 2], 2.0
    adapters = [_adapter(g, 2) for _ in counts]
    for a in adapters:
        a["base_model.model.layers.0.q_proj.lora_magnitude_vector"] = torch.randn(5, generator=g, dtype=torch.float64)
    mean, residual = exact.fedex(adapters, counts)
    want = _target(adapters, counts, [s] * len(counts))
    p = [n / sum(counts) for n in counts]
    for prefix in (P, Q):
        a_bar, b_bar = mean[exact.a_key(prefix)], mean[exact.b_key(prefix)]
        assert torch.allclose(a_bar, sum(pi * a[exact.a_key(prefix)] for pi, a in zip(p, adapters, strict=True)))
        f_a, f_b = residual[prefix]
        assert f_a.shape == (2 * (len(counts) + 1), 6) and f_b.shape == (5, 2 * (len(counts) + 1))
        assert torch.allclose(s * b_bar @ a_bar + s * f_b @ f_a, want[prefix], rtol=1e-12, atol=1e-12)
        # the server's W_{t+1} = W_t + s R, through whichever form travels
        for mode in ("factored", "dense"):
            inc = exact.dense(exact.choose({prefix: residual[prefix]}, s, mode))[prefix]
            assert torch.allclose(s * b_bar @ a_bar + inc, want[prefix], rtol=1e-12, atol=1e-12)
    key = "base_model.model.layers.0.q_proj.lora_magnitude_vector"  # 1-D: a plain weighted mean
    assert torch.allclose(mean[key], sum(pi * a[key] for pi, a in zip(p, adapters, strict=True)))


def test_choose_sends_the_smaller_form() -> None:
    g = torch.Generator().manual_seed(2)
    big = {P: (torch.randn(2, 64, generator=g), torch.randn(48, 2, generator=g))}  # 224 < 3072
    assert set(exact.choose(big)) == {exact.a_key(P), exact.b_key(P)}
    small = {P: (torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g))}  # 64 > 16
    assert set(exact.choose(small)) == {P}
    assert exact.numbers(exact.choose(big)) == 2 * 64 + 48 * 2


def test_add_accumulates_dense_increments() -> None:
    g = torch.Generator().manual_seed(3)
    f = {P: (torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))}
    one = exact.choose(f, 0.5, "factored")
    total = exact.add(exact.add({}, one), one)
    assert torch.allclose(total[P], 2 * 0.5 * f[P][1] @ f[P][0])
