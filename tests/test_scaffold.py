"""SCAFFOLD on the LoRA tensors: option II's control variates on hand-computed tensors, the
per-step correction with the learning rates actually used, the pure variant's gradient term,
and a tiny in-process run (2x FedIT's tensors up and down)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fitted_raw, informative, tiny_raw

from fedblend.algorithms import scaffold as sc
from fedblend.algorithms.base import ClientContext
from fedblend.comm.codec import Message, decode
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment


def test_option2_control_variates_on_hand_tensors():
    c = {"w": torch.tensor([1.0, -2.0])}
    c_i = {"w": torch.tensor([0.5, 0.5])}
    x = {"w": torch.tensor([3.0, 3.0])}
    y = {"w": torch.tensor([2.0, 4.0])}
    # c_i+ = c_i - c + (x - y) / sum(lr): [0.5 - 1 + 1/0.5, 0.5 + 2 - 1/0.5] = [1.5, 0.5]
    c_new = sc.client_control(c, c_i, x, y, lr_sum=0.5)
    assert torch.allclose(c_new["w"], torch.tensor([1.5, 0.5]))
    # server: c + (1/N) sum delta c_i over the clients that answered, N = every client (4)
    deltas = [{"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([0.0, -8.0])}]
    assert torch.allclose(sc.server_control(c, deltas, 4)["w"], torch.tensor([2.0, -4.0]))


def test_server_aggregate_weighted_x_and_control_over_all_clients(tiny_cfg):
    cfg = tiny_cfg(algorithm="scaffold", data={"num_clients": 4})
    algo = sc.Scaffold(cfg)
    state = {"global": {"w": torch.tensor([0.0, 0.0])}, "control": {"w": torch.tensor([1.0, 1.0])}}
    ups = {
        0: Message({"global": {"w": torch.tensor([1.0, 0.0])}, "control": {"w": torch.tensor([3.0, 1.0])}}, 1),
        2: Message({"global": {"w": torch.tensor([4.0, 3.0])}, "control": {"w": torch.tensor([1.0, -3.0])}}, 2),
    }
    new = algo.aggregate(0, ups, state)
    # x: example-weighted mean (1 and 2 examples); control travels as c + delta c_i
    assert torch.allclose(new["global"]["w"], torch.tensor([3.0, 2.0]))
    # c + (delta_0 + delta_2) / 4 = [1, 1] + ([2, 0] + [0, -4]) / 4
    assert torch.allclose(new["control"]["w"], torch.tensor([1.5, 0.0]))


@pytest.fixture
def tiny_cfg():
    def make(**sections):
        return config_from_dict(tiny_raw(**sections))

    return make


@pytest.fixture
def trainer(tiny_cfg):
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.federation import build_federation
    from fedblend.text.trainer import TextTrainer

    cfg = tiny_cfg(algorithm="scaffold")
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    return cfg, TextTrainer(cfg, model, tok), build_federation(cfg)


def _round(cfg, tr, fed, variant, monkeypatch):
    algo = sc.Scaffold(config_from_dict(tiny_raw(algorithm="scaffold", scaffold={"variant": variant})))
    assert algo.settings.variant == variant
    calls = {"correct": [], "grad": 0}
    real_correct, real_grad = sc.correct_step, sc.add_to_gradients

    def spy_correct(params, corr, lr):
        calls["correct"].append(lr)
        real_correct(params, corr, lr)

    def spy_grad(params, corr):
        calls["grad"] += 1
        real_grad(params, corr)

    monkeypatch.setattr(sc, "correct_step", spy_correct)
    monkeypatch.setattr(sc, "add_to_gradients", spy_grad)
    server = algo.init_server_state(tr)
    g = torch.Generator().manual_seed(0)
    server["control"] = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in server["control"].items()}
    c_i = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in server["control"].items()}
    client = fed.clients[0]
    ctx = ClientContext(cid=0, round=0, seed=5, examples=client.train, trainer=tr, cfg=cfg)
    payload = algo.configure_round(0, server, [0])[0]
    update, state = algo.local_update(ctx, payload, {"control": c_i})
    return server, c_i, update, state, calls


def test_option2_corrects_after_every_step_with_that_steps_lr(trainer, monkeypatch):
    cfg, tr, fed = trainer
    server, c_i, update, state, calls = _round(cfg, tr, fed, "option2", monkeypatch)
    steps = tr.train_steps(len(fed.clients[0].train), cfg.train.local_epochs)
    # linear decay, no warm-up: step k (0-based) runs at lr (K - k) / K
    lrs = [cfg.train.lr * (steps - k) / steps for k in range(steps)]
    assert steps >= 2 and calls["grad"] == 0
    assert calls["correct"] == pytest.approx(lrs, rel=1e-6)
    x, c = server["global"], server["control"]
    y = update.tensors["global"]
    want = sc.client_control(c, c_i, x, y, sum(lrs))  # sum of the lrs used, not K * lr
    assert all(torch.allclose(state["control"][k], want[k], atol=1e-6) for k in want)
    sent = update.tensors["control"]  # c + delta c_i
    assert all(torch.allclose(sent[k] - c[k], want[k] - c_i[k], atol=1e-6) for k in want)


def test_correct_step_moves_by_lr_times_correction_exactly():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sc.correct_step({"w": p}, {"w": torch.tensor([0.5, -1.0])}, 0.1)
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]) - 0.1 * torch.tensor([0.5, -1.0]))


def test_pure_variant_adds_the_correction_to_the_gradient(trainer, monkeypatch):
    cfg, tr, fed = trainer
    _, _, _, _, calls = _round(cfg, tr, fed, "pure", monkeypatch)
    steps = tr.train_steps(len(fed.clients[0].train), cfg.train.local_epochs)
    assert calls["grad"] == steps and calls["correct"] == []
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([0.25, 0.25])
    sc.add_to_gradients({"w": p}, {"w": torch.tensor([0.5, -1.0])})
    assert torch.equal(p.grad, torch.tensor([0.75, -0.75]))


def test_refuses_rules_that_replace_its_aggregation(tiny_cfg):
    with pytest.raises(ConfigError, match="aggregate.rule"):
        tiny_cfg(algorithm="scaffold", aggregate={"rule": "median"})
    with pytest.raises(ConfigError, match="scaffold.variant"):
        tiny_cfg(algorithm="scaffold", scaffold={"variant": "option1"})
    assert sc.Scaffold.label(tiny_cfg(algorithm="scaffold", scaffold={"variant": "pure"})) == "scaffold (pure)"


def _tensor_bytes(msg) -> int:
    return sum(t.numel() * t.element_size() for ts in msg.tensors.values() for t in ts.values())


def test_tiny_run_sends_twice_fedit_and_updates_c_over_all_clients(tmp_path: Path, fitted_model: Path):
    sent: list = []
    cfg = config_from_dict(fitted_raw(fitted_model, algorithm="scaffold"))
    summary = run_experiment(cfg, tmp_path / "scaffold", tap=lambda *a: sent.append(a))
    informative(summary)
    msgs = {"scaffold": [(d, r, c, decode(b)) for d, r, c, b in sent]}
    unit = 4 * summary["comm"]["adapter_params"]["global"]  # 1 FedIT unit: one float32 LoRA
    for direction in ("up", "down"):
        got = [_tensor_bytes(m) for d, r, _, m in msgs["scaffold"] if d == direction and r < 2]
        assert got == [2 * unit] * 6
    # round 1's control = round 0's c (zeros) + (1/N) sum of the clients' delta c_i, N = 3
    ups = [m for d, r, _, m in msgs["scaffold"] if d == "up" and r == 0]
    c1 = next(m for d, r, _, m in msgs["scaffold"] if d == "down" and r == 1).tensors["control"]
    for k in c1:
        want = sum(u.tensors["control"][k] for u in ups) / 3
        assert torch.allclose(c1[k], want, atol=1e-7) and want.abs().sum() > 0
