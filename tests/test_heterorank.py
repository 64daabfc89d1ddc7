"""FlexLoRA and HetLoRA end to end in-process (clients at ranks 2, 4, 2, 1), the screening of
rank-r_i updates against their own shapes, and the combinations the methods refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _merged, tiny_raw
from safetensors.torch import load_file

from fedblend.adapters.lora import rank_of, truncate_rank
from fedblend.aggregation import lowrank
from fedblend.algorithms.flexlora import FlexLoRA
from fedblend.algorithms.hetlora import HetLoRA, HetLoRASettings
from fedblend.comm.codec import Message, decode
from fedblend.config import config_from_dict
from fedblend.engines import inprocess
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment
from fedblend.store.files import load_state
from fedblend.trust import screen_updates

RANKS = [2, 4, 2, 1]  # client 0 below the top rank: its truncation is not the global adapter


def _raw(algo: str, **sections) -> dict:
    raw = tiny_raw(algorithm=algo, lora={"r": 4, "alpha": 8, "dropout": 0.0, "client_ranks": RANKS},
                   data={"kind": "synthetic", "num_clients": 4, "synthetic_train_per_client": 8,
                         "synthetic_test_per_task": 2})
    return _merged(raw, sections)


def _run(tmp_path: Path, algo: str, **sections):
    sent: list[tuple[str, int, int, bytes]] = []
    cfg = config_from_dict(_raw(algo, **sections))
    out = tmp_path / algo
    summary = run_experiment(cfg, out, tap=lambda *a: sent.append(a))
    return cfg, summary, out, [(d, r, c, data, decode(data)) for d, r, c, data in sent]


def _tensor_bytes(msg: Message) -> int:
    return sum(t.numel() * t.element_size() for ts in msg.tensors.values() for t in ts.values())


def test_flexlora_sends_rank_ri_factors_and_keeps_the_svd_truncation(tmp_path: Path):
    cfg, summary, out, msgs = _run(tmp_path, "flexlora", flexlora={"evaluate": "client"})
    assert (out / "summary.json").is_file() and summary["algorithm"] == "flexlora"
    # each client scored at its own rank: three distinct models (clients 1 and 2 share rank 2,
    # so one generation serves both), each over all 4 tasks x 2 test instances
    assert summary["time"]["generated_instances"] == 3 * 4 * 2
    # ... while adapters/global is the server's rank-4 truncation
    exported = load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))
    final = load_state(out / "final" / "server.safetensors")["global"]
    assert len(exported) == len(final) and all(
        any(torch.equal(t, f) for f in final.values()) for t in exported.values())
    ups = {(r, c): (data, m) for d, r, c, data, m in msgs if d == "up"}
    assert sorted(ups) == [(r, c) for r in (0, 1) for c in range(4)]
    for (_, c), (_, m) in ups.items():
        assert rank_of(m.tensors["global"]) == RANKS[c]
    for d, r, c, _, m in msgs:  # every payload of a training round at the client's rank
        if d == "down" and r < cfg.train.rounds:
            assert rank_of(m.tensors["global"]) == RANKS[c]
    # bytes: the rank-1 client sends a quarter of the rank-4 client's tensors; the rest is the
    # safetensors header (names, shapes), the same size give or take a few digits
    big, small = ups[(1, 1)], ups[(1, 3)]
    assert _tensor_bytes(small[1]) * 4 == _tensor_bytes(big[1])
    assert abs((len(small[0]) - _tensor_bytes(small[1])) - (len(big[0]) - _tensor_bytes(big[1]))) < 64
    assert summary["comm"]["bytes_up"] == sum(len(data) for data, _ in ups.values())
    # the server's global adapter is the rank-4 truncation of sum_i p_i s_i B_i A_i of the
    # last round's uploads (equal data sizes: p_i = 1/4; constant scaling s = alpha / r = 2)
    server = load_state(out / "final" / "server.safetensors")["global"]
    last = [ups[(1, c)][1] for c in range(4)]
    n = sum(m.num_examples for m in last)
    for prefix, kinds in lowrank.layers(server).items():
        dense = sum(m.num_examples / n * 2.0 * m.tensors["global"][kinds["lora_B"]].double()
                    @ m.tensors["global"][kinds["lora_A"]].double() for m in last)
        u, s, vh = torch.linalg.svd(dense)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        got = 2.0 * server[kinds["lora_B"]].double() @ server[kinds["lora_A"]].double()
        assert torch.allclose(got, best, atol=1e-5), prefix
        assert s[4] > 1e-3 * s[0]  # dW_g has rank > 4 here: the truncation is not a no-op
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == {} and r["aggregation"]["rule"] == "flexlora" for r in rounds)
    assert 0 < rounds[-1]["aggregation"]["energy_kept"] < 1


def test_hetlora_prunes_ranks_and_the_server_remembers_them(tmp_path: Path, monkeypatch):
    # a strong penalty on the last half of the ranks: its norm product falls in local training
    # from round 1 on (round 0 starts from B = 0: nothing to fall from), so ranks shrink
    cfg, _, out, msgs = _run(tmp_path, "hetlora", train={"rounds": 3}, hetlora={"gamma": 0.5, "lam": 50.0},
                             engine={"progress": False, "checkpoint_every": 1})
    assert cfg.section("hetlora").gamma == 0.5
    ups = {(r, c): m for d, r, c, _, m in msgs if d == "up"}
    downs = {(r, c): m for d, r, c, _, m in msgs if d == "down" and r < cfg.train.rounds}
    assert [rank_of(ups[(0, c)].tensors["global"]) for c in range(4)] == RANKS  # round 0: no fall
    expect = list(RANKS)
    for rnd in (1, 2):
        for c in range(4):
            m = ups[(rnd, c)]
            assert rank_of(downs[(rnd, c)].tensors["global"]) == expect[c]  # what the server sent
            before, after = m.metrics["tail_norm_before"], m.metrics["tail_norm_after"]
            r_new = max(1, expect[c] // 2) if after < before else expect[c]
            assert rank_of(m.tensors["global"]) == r_new == m.config["rank"] == m.metrics["rank"]
            expect[c] = r_new
    assert expect != RANKS and all(e <= r for e, r in zip(expect, RANKS, strict=True))
    # the checkpointed server state (what a resumed run starts from) holds every client's rank
    server = load_state(out / "checkpoint" / "v3" / "server.safetensors")
    assert {k: int(v) for k, v in server["hetlora_ranks"].items()} == {str(c): expect[c] for c in range(4)}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["rejected"] == {} and last["aggregation"]["ranks"] == {str(c): expect[c] for c in range(4)}
    assert (out / "summary.json").is_file()
    # a run that crashes in round 2 and resumes from the round-2 checkpoint sends the pruned
    # ranks (the server's checkpoint, not the configured ranks) and ends where this one did
    original = inprocess.Transport.up

    def crash_in_round_2(self, rnd, cid, msg, allowed):
        if rnd == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, rnd, cid, msg, allowed)

    monkeypatch.setattr(inprocess.Transport, "up", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "crash")
    monkeypatch.setattr(inprocess.Transport, "up", original)
    sent: list = []
    resumed = run_experiment(cfg, tmp_path / "crash", resume=True, tap=lambda *a: sent.append(a))
    assert resumed["resumed_at_round"] == 2
    again = {c: decode(data) for d, r, c, data in sent if d == "down" and r == 2}
    assert {c: rank_of(m.tensors["global"]) for c, m in again.items()} == \
        {c: rank_of(downs[(2, c)].tensors["global"]) for c in range(4)}
    g1 = load_state(out / "checkpoint" / "v3" / "server.safetensors")
    g2 = load_state(tmp_path / "crash" / "checkpoint" / "v3" / "server.safetensors")
    assert all(torch.equal(g1[r][k], g2[r][k]) for r in ("global", "hetlora_ranks") for k in g1[r])


def _fake_state(r: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"global": {"m.lora_A.weight": torch.randn(r, 6, generator=g),
                       "m.lora_B.weight": torch.randn(5, r, generator=g)}}


def test_screening_checks_each_update_against_its_clients_rank():
    cfg = config_from_dict(_raw("flexlora"))
    alg, server = FlexLoRA(cfg), _fake_state()
    good = Message({"global": alg.payload_for(3, server)}, 4)
    wrong = Message({"global": alg.payload_for(1, server)}, 4)  # rank 4 from a rank-2 client
    ok, rejected = screen_updates(alg, cfg, {3: good, 0: wrong}, server)
    assert set(ok) == {3}
    assert rejected == {0: "global/m.lora_A.weight: shape [4, 6], expected [2, 6]"}
    # HetLoRA: the rank sent, or the pruned one the update declares; nothing else
    cfg = config_from_dict(_raw("hetlora"))
    alg = HetLoRA(cfg)
    st = HetLoRASettings()
    pruned = lowrank.prune_rank(4, st.gamma, st.r_min, 1.0, 0.0)  # floor(0.99 * 4) = 3
    same = Message({"global": truncate_rank(server["global"], 4)}, 4, config={"rank": 4})
    cut = Message({"global": truncate_rank(server["global"], pruned)}, 4, config={"rank": pruned})
    lie = Message({"global": truncate_rank(server["global"], 2)}, 4, config={"rank": 3})
    jump = Message({"global": truncate_rank(server["global"], 2)}, 4, config={"rank": 2})  # 4 -> 2: not allowed
    ok, rejected = screen_updates(alg, cfg, {0: same, 1: cut, 2: lie, 4: jump}, {**server, "hetlora_ranks": {
        "0": torch.tensor([4]), "1": torch.tensor([4]), "2": torch.tensor([4]), "4": torch.tensor([4])}})
    assert set(ok) == {0, 1}
    assert rejected == {2: "global/m.lora_A.weight: shape [2, 6], expected [3, 6]",
                        4: "global/m.lora_A.weight: shape [2, 6], expected [4, 6]"}


@pytest.mark.parametrize("algo", ["flexlora", "hetlora"])
def test_client_evaluation_uses_the_clients_truncation(algo: str):
    cls, server = {"flexlora": FlexLoRA, "hetlora": HetLoRA}[algo], _fake_state()
    alg = cls(config_from_dict(_raw(algo)))
    final = alg.final_payload(server)
    state = alg.init_client_state(None, 3)  # rank 1
    assert alg.eval_adapters(final, state)["global"] is final.tensors["global"]  # default: global
    alg = cls(config_from_dict(_raw(algo, **{algo: {"evaluate": "client"}})))
    got = alg.eval_adapters(final, state)["global"]
    a, b = got["m.lora_A.weight"], got["m.lora_B.weight"]
    assert a.shape == (4, 6) and torch.count_nonzero(a[1:]) == 0 and torch.count_nonzero(b[:, 1:]) == 0
    assert torch.equal(b[:, :1] @ a[:1], server["global"]["m.lora_B.weight"][:, :1] @ server["global"]["m.lora_A.weight"][:1])


@pytest.mark.parametrize("algo", ["flexlora", "hetlora"])
def test_refused_and_accepted_settings(algo: str):
    assert config_from_dict(_raw(algo)).client_rank(3) == 1  # heterogeneous ranks: accepted
    assert config_from_dict(tiny_raw(algorithm=algo)).client_rank(2) == 4  # equal ranks run too
    assert config_from_dict(_raw(algo, lora={"dora": True})).lora.dora  # m is rank-independent
    for section, why in (({"aggregate": {"rule": "median"}}, "aggregate.rule"),
                         ({"privacy": {"clip": 1.0}}, "privacy.clip"),
                         ({algo: {"evaluate": "best"}}, f"{algo}.evaluate")):
        with pytest.raises(ConfigError, match=why):
            config_from_dict(_raw(algo, **section))
    if algo == "flexlora":
        with pytest.raises(ConfigError, match="train.server_momentum"):
            config_from_dict(_raw(algo, train={"server_momentum": 0.9}))
    else:
        with pytest.raises(ConfigError, match="hetlora.gamma"):
            config_from_dict(_raw(algo, hetlora={"gamma": 1.5}))
    with pytest.raises(ConfigError, match="lora.client_ranks"):  # and a method needing one rank refuses them
        config_from_dict(_raw("fedit"))


@pytest.mark.parametrize("algo", ["flexlora", "hetlora"])
def test_compressed_updates_decompress_onto_what_the_client_was_sent(algo: str):
    from fedblend.comm import compress as cz

    cfg = config_from_dict(_raw(algo))
    alg, server = {"flexlora": FlexLoRA, "hetlora": HetLoRA}[algo](cfg), _fake_state()
    sent = Message({"global": alg.payload_for(0, server)})  # client 0: rank 2
    trained = {k: t + 0.01 * (i + 1) for i, (k, t) in enumerate(sorted(sent.tensors["global"].items()))}
    kept = [2, 1] if algo == "hetlora" else [2]  # HetLoRA may prune: floor(0.99 * 2) = 1
    for r in kept:
        up = Message({"global": truncate_rank(trained, r)}, 4, config={"rank": r})
        packed, _ = cz.compress(up, sent, "fp16", {})
        ok, rejected = screen_updates(alg, cfg, {0: packed}, server)
        assert rejected == {} and set(ok) == {0}
        got = ok[0].tensors["global"]
        assert all(torch.allclose(got[k], up.tensors["global"][k], atol=1e-3) for k in got)
