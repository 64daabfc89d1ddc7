"""FlexLoRA's and HetLoRA's maths (fedblend.aggregation.lowrank) on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedblend.aggregation import lowrank as lr

PRE = "base_model.model.layers.0.q_proj"
KA, KB, KM = f"{PRE}.lora_A.weight", f"{PRE}.lora_B.weight", f"{PRE}.lora_magnitude_vector.weight"


def _adapter(b: torch.Tensor, a: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
    return {KA: a, KB: b, **extra}


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_layers_groups_by_module_prefix():
    t = {KA: 0, KB: 0, KM: 0, "x.lora_A.weight": 0, "x.lora_B.weight": 0}
    assert lr.layers(t) == {PRE: {"lora_A": KA, "lora_B": KB, "lora_magnitude_vector": KM},
                            "x": {"lora_A": "x.lora_A.weight", "lora_B": "x.lora_B.weight"}}
    with pytest.raises(ValueError, match="both"):
        lr.layers({KA: 0})


# ---- FlexLoRA ----------------------------------------------------------------------------------
def test_flexlora_svd_equals_the_dense_weighted_sum():
    d_out, d_in = 7, 5
    ranks, p, s = [3, 2, 1], [0.5, 0.3, 0.2], [2.0, 4.0, 8.0]
    factors = [(_rand((d_out, r), 10 + i), _rand((r, d_in), 20 + i), p[i] * s[i]) for i, r in enumerate(ranks)]
    dense = sum(c * b @ a for b, a, c in factors)
    u, sig, vh = lr.flexlora_svd(factors)
    assert sig.numel() == min(d_out, d_in, sum(ranks))
    assert torch.allclose(u @ torch.diag(sig) @ vh, dense, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(sig.numel(), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vh @ vh.T, torch.eye(sig.numel(), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sig, torch.linalg.svdvals(dense), atol=1e-12)


def test_flexlora_truncation_is_the_best_rank_r_approximation():
    d_out, d_in = 8, 7
    ups = [(_adapter(_rand((d_out, 4), 1), _rand((4, d_in), 2)), 0.25, 0.5),
           (_adapter(_rand((d_out, 2), 3), _rand((2, d_in), 4)), 0.75, 1.0)]
    dense = sum(p * s * t[KB] @ t[KA] for t, p, s in ups)
    tail = torch.linalg.svdvals(dense)
    assert tail[6] < 1e-10 * tail[0] < tail[5]  # rank 6 = 4 + 2
    for r in (1, 2, 3, 4):
        out, info = lr.flexlora_aggregate(ups, r, scale=2.0)
        assert out[KA].shape == (r, d_in) and out[KB].shape == (d_out, r)
        approx = 2.0 * out[KB] @ out[KA]
        # Eckart-Young: the error of the best rank-r approximation is the tail singular values
        err = torch.linalg.matrix_norm(dense - approx)
        assert math.isclose(float(err), float(tail[r:].square().sum().sqrt()), rel_tol=1e-9)
        u, s, vh = torch.linalg.svd(dense)
        assert torch.allclose(approx, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-10)
        assert torch.allclose(out[KA] @ out[KA].T, torch.eye(r, dtype=torch.float64), atol=1e-10)  # A = V^T
        assert math.isclose(info["energy_kept"], float(s[:r].square().sum() / s.square().sum()), rel_tol=1e-9)


def test_flexlora_pads_a_rank_beyond_the_aggregate_and_averages_dora_magnitudes():
    b, a = _rand((5, 1), 5), _rand((1, 4), 6)
    ups = [(_adapter(b, a, **{KM: torch.ones(5, dtype=torch.float64)}), 1.0, 2.0)]
    out, _ = lr.flexlora_aggregate(ups, 3, scale=1.0)  # dW = 2 b a has rank 1 (one client)
    assert out[KA].shape == (3, 4) and out[KB].shape == (5, 3)
    assert torch.allclose(out[KB] @ out[KA], 2.0 * b @ a, atol=1e-12)
    assert torch.count_nonzero(out[KA][1:]) == 0 and torch.count_nonzero(out[KB][:, 1:]) == 0
    ups = [(_adapter(b, a, **{KM: torch.ones(5, dtype=torch.float64)}), 0.25, 1.0),
           (_adapter(2 * b, a, **{KM: 3 * torch.ones(5, dtype=torch.float64)}), 0.75, 1.0)]
    out, _ = lr.flexlora_aggregate(ups, 3, scale=1.0)
    assert torch.allclose(out[KB] @ out[KA], 1.75 * b @ a, atol=1e-12)
    assert torch.allclose(out[KM], torch.full((5,), 0.25 + 0.75 * 3, dtype=torch.float64))


def test_client_factors_give_the_rank_ri_truncation_at_the_clients_scaling():
    d_out, d_in = 6, 5
    dense = _rand((d_out, d_in), 9)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    b, a = lr.svd_factors(u, s, vh, 4, scale=0.5)  # the server's rank-4 global at s = 0.5
    g = _adapter(b, a)
    for r, s_i in ((4, 0.5), (2, 4.0), (1, 2.0)):
        t = lr.client_factors(g, r, 0.5 / s_i)
        assert torch.allclose(s_i * t[KB] @ t[KA], u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-12)


# ---- HetLoRA -----------------------------------------------------------------------------------
def test_hetlora_hand_worked_example():
    # two clients at ranks 2 and 1 on a 2x2 layer, server rank 3, s = 1 everywhere
    b1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a1 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # s B1 A1 = diag(3, 4): ||.||_F = 5
    b2 = torch.tensor([[6.0], [0.0]])
    a2 = torch.tensor([[0.0, 2.5]])  # s B2 A2 = [[0, 15], [0, 0]]: ||.||_F = 15
    prev = _adapter(torch.full((2, 3), 7.0), torch.full((3, 2), 9.0))
    out, w = lr.hetlora_aggregate([(_adapter(b1, a1), 1.0), (_adapter(b2, a2), 1.0)], prev, scale=1.0)
    assert w[PRE] == pytest.approx([0.25, 0.75])
    # slot 0: 0.25 * B1[:,0] + 0.75 * B2[:,0]; slot 1: 0.25 * B1[:,1] (client 2 pads a zero);
    # slot 2: nobody covers it, the previous global stays
    assert torch.allclose(out[KB], torch.tensor([[0.25 + 0.75 * 6, 0.0, 7.0], [0.0, 0.25, 7.0]]))
    assert torch.allclose(out[KA], torch.tensor([[0.75, 0.75 * 2.5], [0.0, 1.0], [9.0, 9.0]]))


def test_hetlora_weights_use_the_scaled_update_and_rescale_to_the_server_scaling():
    b, a = _rand((4, 2), 1), _rand((2, 3), 2)
    prev = _adapter(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    # the same factors at scalings 1 and 3: S_k = s_k ||B A|| -> weights 1/4, 3/4
    out, w = lr.hetlora_aggregate([(_adapter(b, a), 1.0), (_adapter(b, a), 3.0)], prev, scale=2.0)
    assert w[PRE] == pytest.approx([0.25, 0.75])
    f = 0.25 * math.sqrt(1 / 2) + 0.75 * math.sqrt(3 / 2)  # each brought to s = 2 by sqrt(s_k / 2)
    assert torch.allclose(out[KB], f * b) and torch.allclose(out[KA], f * a)
    # rescale: the same update at another scaling
    t = lr.rescale(_adapter(b, a), 3.0 / 2.0)
    assert torch.allclose(2.0 * t[KB] @ t[KA], 3.0 * b @ a)


def test_hetlora_equal_weights_when_every_update_is_zero_and_dora_by_examples():
    z = _adapter(torch.zeros(2, 1), torch.ones(1, 2), **{KM: torch.ones(2)})
    y = _adapter(torch.zeros(2, 1), 3 * torch.ones(1, 2), **{KM: 5 * torch.ones(2)})
    prev = _adapter(torch.zeros(2, 1), torch.zeros(1, 2), **{KM: torch.zeros(2)})
    out, w = lr.hetlora_aggregate([(z, 1.0), (y, 1.0)], prev, 1.0, example_weights=[3, 1])
    assert w[PRE] == [0.5, 0.5]
    assert torch.allclose(out[KA], 2 * torch.ones(1, 2))
    assert torch.allclose(out[KM], torch.full((2,), 0.75 + 1.25))


def test_hetlora_penalty_and_pruning():
    b = torch.tensor([[1.0, 2.0, 0.0, 2.0], [0.0, 0.0, 3.0, 1.0]], requires_grad=True)
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 4.0], [3.0, 0.0]], requires_grad=True)
    t = _adapter(b, a)
    # r = 4, gamma = 0.7: q = floor(2.8) = 2 -> columns/rows 2..3
    pen = lr.hetlora_penalty(t, 4, 0.7, lam=0.1)
    assert float(pen.detach()) == pytest.approx(0.1 * math.sqrt(9 + 4 + 1) * math.sqrt(16 + 9))
    pen.backward()  # differentiable, and only through the penalised slots
    assert torch.count_nonzero(b.grad[:, :2]) == 0 and torch.count_nonzero(a.grad[:2]) == 0
    assert torch.count_nonzero(b.grad[:, 2:]) > 0
    # r = 3 of a zero-padded adapter: q = floor(2.1) = 2, slot 3 (the padding) is left out
    assert float(lr.tail_norm_product(t, 3, 0.7).detach()) == pytest.approx(3.0 * 4.0)
    # r = 1, gamma = 0.99: q = 0, the whole factor pair
    assert float(lr.tail_norm_product(t, 1, 0.99).detach()) == pytest.approx(1.0 * math.sqrt(2))
    assert lr.prune_rank(4, 0.7, 1, before=2.0, after=1.0) == 2
    assert lr.prune_rank(4, 0.7, 3, before=2.0, after=1.0) == 3  # r_min
    assert lr.prune_rank(4, 0.7, 1, before=1.0, after=1.0) == 4  # did not fall
    assert lr.prune_rank(8, 0.99, 1, before=1.0, after=0.5) == 7
    assert lr.prune_rank(1, 0.99, 1, before=1.0, after=0.5) == 1
    assert lr.prune_rank(2, 0.99, 4, before=1.0, after=0.5) == 2  # never grows
