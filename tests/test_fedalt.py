"""FedALT: the rest-of-world LoRA excludes the client's own (hand tensors, N = 3 and N = 2),
the router's softmax mixing equals the explicit formula, the router never leaves the client,
and a tiny in-process run (1x FedIT's tensors up and down)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fitted_raw, informative, tiny_raw

from fedblend.adapters.router import ROUTER, route, router_for
from fedblend.algorithms.fedalt import FedALT, rest_of_world
from fedblend.comm.codec import Message, decode
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.rounds import ProtocolViolation, check_roles
from fedblend.runner import run_experiment
from fedblend.store.files import load_state


def _cfg(**sections):
    return config_from_dict(tiny_raw(algorithm="fedalt", **sections))


def _up(a: list[float], n: int = 1) -> Message:
    return Message({"individual": {"w": torch.tensor(a)}}, n)


def _server(n_clients: int) -> dict:
    return {"init": {"w": torch.tensor([9.0, 9.0])}, "individual": {"w": torch.zeros(2)}}


def test_rest_of_world_excludes_own_lora_n3_uniform_and_by_examples():
    algo = FedALT(_cfg())
    state = algo.aggregate(0, {0: _up([1.0, 0.0], 1), 1: _up([0.0, 2.0], 3), 2: _up([4.0, 4.0], 4)}, _server(3))
    pay = {cid: m.tensors["row"]["w"] for cid, m in algo.configure_round(1, state, [0, 1, 2]).items()}
    assert torch.allclose(pay[0], torch.tensor([2.0, 3.0]))  # mean of clients 1 and 2
    assert torch.allclose(pay[1], torch.tensor([2.5, 2.0]))
    assert torch.allclose(pay[2], torch.tensor([0.5, 1.0]))
    algo = FedALT(_cfg(fedalt={"row_weights": "examples"}))
    state = algo.aggregate(0, {0: _up([1.0, 0.0], 1), 1: _up([0.0, 2.0], 3), 2: _up([4.0, 4.0], 4)}, _server(3))
    pay = algo.configure_round(1, state, [0])[0].tensors["row"]["w"]
    assert torch.allclose(pay, torch.tensor([16.0, 22.0]) / 7)  # (3 [0, 2] + 4 [4, 4]) / 7


def test_rest_of_world_of_two_clients_is_the_other_ones_and_round_0_is_the_init():
    algo = FedALT(_cfg(data={"num_clients": 2}))
    server = _server(2)
    assert all(torch.equal(m.tensors["row"]["w"], server["init"]["w"])
               for m in algo.configure_round(0, server, [0, 1]).values())
    state = algo.aggregate(0, {0: _up([1.0, 5.0]), 1: _up([-3.0, 0.5])}, server)
    pay = algo.configure_round(1, state, [0, 1])
    assert torch.allclose(pay[0].tensors["row"]["w"], torch.tensor([-3.0, 0.5]))
    assert torch.allclose(pay[1].tensors["row"]["w"], torch.tensor([1.0, 5.0]))
    # a client that sat out keeps its last upload in the others' RoW
    state = algo.aggregate(1, {1: _up([7.0, 7.0])}, state)
    assert torch.allclose(algo.configure_round(2, state, [0])[0].tensors["row"]["w"], torch.tensor([7.0, 7.0]))
    assert torch.allclose(algo.configure_round(2, state, [1])[1].tensors["row"]["w"], torch.tensor([1.0, 5.0]))
    assert rest_of_world({"w": torch.ones(1)}, 1.0, {"w": torch.ones(1)}, 1.0) is None  # alone: none


def test_one_client_is_refused():
    with pytest.raises(ConfigError, match="data.num_clients: fedalt needs at least 2 clients"):
        _cfg(data={"num_clients": 1})
    for section in ({"aggregate": {"rule": "median"}}, {"privacy": {"clip": 1.0}}, {"train": {"server_lr": 0.5}}):
        with pytest.raises(ConfigError, match=next(iter(section))):
            _cfg(**section)


def test_router_mixes_the_two_loras_per_token_by_softmax():
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.trainer import TextTrainer

    cfg = _cfg()
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    tr = TextTrainer(cfg, model, tok)
    ad = tr.adapters
    router = router_for(ad)
    try:
        g = torch.Generator().manual_seed(1)
        for role in ("global", "local"):
            ad.set(role, {k: torch.randn(t.shape, generator=g) for k, t in ad.get(role).items()})
        ad.set(ROUTER, {k: torch.randn(t.shape, generator=g) for k, t in ad.get(ROUTER).items()})
        name, layer = next((n, m) for n, m in ad.model.named_modules() if hasattr(m, "lora_A"))
        x = torch.randn(2, 5, layer.in_features, generator=g)
        s = cfg.lora.alpha / cfg.lora.r
        w0 = layer.base_layer.weight
        lora = {r: layer.lora_B[r].weight @ layer.lora_A[r].weight for r in ("global", "local")}
        gate = torch.softmax(x @ ad.get(ROUTER)[name + ".router.weight"].T, dim=-1)  # (2, 5, 2)
        want = x @ w0.T + s * (gate[..., :1] * (x @ lora["global"].T) + gate[..., 1:] * (x @ lora["local"].T))
        with torch.no_grad(), ad.mixing({"global": 1.0, "local": 1.0}):
            got = layer(x)
            assert layer.scaling["global"] == s  # put back after the forward
        assert torch.allclose(got, want, atol=1e-5)
        assert gate.std() > 0.05  # the gates differ from token to token
        assert torch.allclose(route(x, ad.get(ROUTER)[name + ".router.weight"]), gate)
    finally:
        router.detach()
    assert ROUTER not in ad.params


def test_router_is_never_a_shared_role():
    msg = Message({"individual": {"w": torch.zeros(1)}, ROUTER: {"w": torch.zeros(1)}}, 1)
    with pytest.raises(ProtocolViolation, match="router"):
        check_roles(0, msg, FedALT.shared_roles)


def _tensor_bytes(msg) -> int:
    return sum(t.numel() * t.element_size() for ts in msg.tensors.values() for t in ts.values())


def test_tiny_run_keeps_router_local_and_sends_one_fedit(tmp_path: Path, fitted_model: Path):
    sent: list = []
    cfg = config_from_dict(fitted_raw(fitted_model, algorithm="fedalt"))
    summary = run_experiment(cfg, tmp_path / "fedalt", tap=lambda *a: sent.append(a))
    informative(summary)
    msgs = {"fedalt": [(d, r, c, decode(b)) for d, r, c, b in sent]}
    unit = 4 * summary["comm"]["adapter_params"]["global"]  # 1 FedIT unit: one float32 LoRA
    for direction in ("up", "down"):
        got = [_tensor_bytes(m) for d, r, _, m in msgs["fedalt"] if d == direction and r < 2]
        assert got == [unit] * 6
    ups = {(r, c): m for d, r, c, m in msgs["fedalt"] if d == "up"}
    assert all(set(m.tensors) == {"individual"} for m in ups.values())
    assert all(".lora_" in k for m in ups.values() for k in m.tensors["individual"])
    # round 1's RoW of each client = the mean of the OTHER clients' round-0 uploads
    for d, r, c, m in msgs["fedalt"]:
        if d == "down" and r == 1:
            others = [ups[(0, j)].tensors["individual"] for j in range(3) if j != c]
            for k, t in m.tensors["row"].items():
                assert torch.allclose(t, (others[0][k] + others[1][k]) / 2, atol=1e-7)
    # each client trained its router (from its own init) and kept it, with its RoW of the final uploads
    run = tmp_path / "fedalt"
    states = {c: load_state(run / "final" / "clients" / f"{c}.safetensors") for c in range(3)}
    for c, st in states.items():
        assert set(st) == {"local", ROUTER, "row"}
        last = {j: ups[(1, j)].tensors["individual"] for j in range(3)}
        for k, t in st["row"].items():
            want = sum(last[j][k] for j in range(3) if j != c) / 2
            assert torch.allclose(t, want, atol=1e-6)
    seed = cfg.seed
    for c, st in states.items():  # trained away from its Kaiming init (TokenRouter.fresh's draw)
        torch.manual_seed(seed + 7_919 + c)
        for k in sorted(st[ROUTER]):
            init = torch.nn.init.kaiming_uniform_(torch.empty(st[ROUTER][k].shape), a=5 ** 0.5)
            assert not torch.allclose(st[ROUTER][k], init)
