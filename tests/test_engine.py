from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fitted_raw, informative, tiny_raw

from fedblend.aggregation.fedavg import weighted_mean
from fedblend.comm.codec import Message, decode, encode
from fedblend.config import config_from_dict
from fedblend.engines import inprocess
from fedblend.errors import FedblendError
from fedblend.runner import run_experiment
from fedblend.store.files import load_state
from fedblend.store.rundir import RunDir

SUMMARY_KEYS = {"algorithm", "rounds", "seed", "clients", "mean", "metric", "comm", "time", "memory"}


def test_codec_roundtrip_counts_bytes():
    msg = Message({"global": {"a": torch.arange(6.0).view(2, 3)}}, num_examples=7, metrics={"loss": 0.5})
    data = encode(msg)
    back = decode(data)
    assert back.num_examples == 7 and back.metrics == {"loss": 0.5}
    assert torch.equal(back.tensors["global"]["a"], msg.tensors["global"]["a"])
    assert msg.num_bytes() == len(data) > 24


def test_weighted_mean():
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(weighted_mean([(a, 1), (b, 3)])["x"], torch.tensor([2.5, 5.0]))
    with pytest.raises(ValueError):
        weighted_mean([(a, 1), ({"y": torch.zeros(2)}, 1)])


def _run(tmp_path: Path, name: str, tap=None, fitted: Path | None = None, **sections):
    """A tiny run; on the fitted model (answers not empty) where ``fitted`` is its path."""
    cfg = config_from_dict(fitted_raw(fitted, **sections) if fitted else tiny_raw(**sections))
    return run_experiment(cfg, tmp_path / name, tap=tap), tmp_path / name


def test_fedit_run_writes_a_complete_run_dir(tmp_path: Path):
    summary, out = _run(tmp_path, "fedit")
    assert SUMMARY_KEYS <= set(summary)
    assert set(summary["clients"]) == {"0", "1", "2"}
    for c in summary["clients"].values():
        assert {"task", "P", "TTP"} <= set(c) and 0.0 <= c["P"] <= 1.0
    assert summary["comm"]["bytes_up"] > 0 and summary["comm"]["bytes_down"] > 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "config.toml").is_file() and (out / "report.html").is_file()
    assert (out / "adapters" / "global" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 3


def test_same_seed_same_numbers(tmp_path: Path, fitted_model: Path):
    a, out_a = _run(tmp_path, "a", fitted=fitted_model)
    # without sharing identical models' generations: the same scores, every client generates
    b, out_b = _run(tmp_path, "b", fitted=fitted_model, eval={"dedupe": False})
    assert informative(a)["clients"] == b["clients"]
    preds = (out_a / "eval" / "predictions.jsonl").read_text()
    assert preds == (out_b / "eval" / "predictions.jsonl").read_text()
    assert a["time"]["eval_instances"] == b["time"]["eval_instances"] == 27  # 3 clients x 3 tasks x 3
    assert a["time"]["generated_instances"] == 9  # FedIT: one model shared by all clients
    assert b["time"]["generated_instances"] == 27
    # no wall-clock value travels in a payload: the byte counts are exactly reproducible, and
    # the clients' training seconds are logged by the engine beside their metrics
    assert a["comm"] == b["comm"]
    for line in (out_a / "metrics.jsonl").read_text().splitlines():
        assert all(m["train_s"] > 0 for m in json.loads(line)["client_metrics"].values())
    ga = load_state(RunDir(out_a).checkpoint_dir() / "server.safetensors")["global"]
    gb = load_state(RunDir(out_b).checkpoint_dir() / "server.safetensors")["global"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    _, out_c = _run(tmp_path, "c", fitted=fitted_model, seed=11)
    gc = load_state(RunDir(out_c).checkpoint_dir() / "server.safetensors")["global"]
    assert any(not torch.equal(ga[k], gc[k]) for k in ga)


def test_local_adapters_never_cross_the_wire(tmp_path: Path):
    sent: list[tuple[str, int, int, bytes]] = []
    summary, out = _run(tmp_path, "local", tap=lambda *a: sent.append(a), algorithm="local")
    uploads = [decode(d) for direction, _, _, d in sent if direction == "up"]
    assert len(uploads) == 2 * 3
    assert all(u.tensors == {} for u in uploads)
    local_states = [load_state(p) for p in sorted((out / "clients").glob("*.safetensors"))]
    local_tensors = [t for st in local_states for t in st["local"].values()]
    for _, _, _, data in sent:
        for role in decode(data).tensors.values():
            for t in role.values():
                assert not any(t.shape == lt.shape and torch.equal(t, lt) for lt in local_tensors)
    assert len(list((out / "adapters" / "local").iterdir())) == 3
    assert summary["comm"]["bytes_up"] < 1000 * 6  # metrics only, no tensors


def test_engine_refuses_undeclared_roles(tmp_path: Path, monkeypatch):
    from fedblend.algorithms.local import Local

    original = Local.local_update

    def leaky(self, ctx, payload, state):
        update, state = original(self, ctx, payload, state)
        update.tensors["local"] = state["local"]
        return update, state

    monkeypatch.setattr(Local, "local_update", leaky)
    with pytest.raises(inprocess.ProtocolViolation, match="local"):
        _run(tmp_path, "leak", algorithm="local")
    assert not (tmp_path / "leak" / "summary.json").exists()
    assert json.loads((tmp_path / "leak" / "status.json").read_text())["status"] == "failed"


def test_resume_after_a_crash_gives_the_same_result(tmp_path: Path, monkeypatch, fitted_model: Path):
    full, out_full = _run(tmp_path, "full", fitted=fitted_model, train={"rounds": 3})
    original = inprocess.Transport.up
    calls = {"n": 0}

    def crash_in_round_2(self, rnd, cid, msg, allowed):
        if rnd == 2:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return original(self, rnd, cid, msg, allowed)

    monkeypatch.setattr(inprocess.Transport, "up", crash_in_round_2)
    cfg = config_from_dict(fitted_raw(fitted_model, train={"rounds": 3}))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "crash")
    assert not (tmp_path / "crash" / "summary.json").exists()
    with pytest.raises(FedblendError, match="--resume"):
        run_experiment(cfg, tmp_path / "crash")
    monkeypatch.setattr(inprocess.Transport, "up", original)
    resumed = run_experiment(cfg, tmp_path / "crash", resume=True)
    assert resumed["resumed_at_round"] == 2
    assert resumed["clients"] == informative(full)["clients"]
    assert (tmp_path / "crash" / "eval" / "predictions.jsonl").read_text() == \
        (out_full / "eval" / "predictions.jsonl").read_text()
    assert resumed["comm"]["bytes_up"] == full["comm"]["bytes_up"]
    g1 = load_state(RunDir(out_full).checkpoint_dir() / "server.safetensors")["global"]
    g2 = load_state(RunDir(tmp_path / "crash").checkpoint_dir() / "server.safetensors")["global"]
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert [r["round"] for r in map(json.loads, (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]


def test_completed_run_is_not_overwritten(tmp_path: Path):
    _run(tmp_path, "done")
    with pytest.raises(FedblendError, match="completed run"):
        _run(tmp_path, "done")


def test_centralized_pools_all_clients(tmp_path: Path):
    summary, out = _run(tmp_path, "central", algorithm="centralized")
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["clients"] == [0]
    assert rounds[0]["client_metrics"]["0"]["examples"] == 3 * 8
    ttps = {c["TTP"] for c in summary["clients"].values()}
    assert len(ttps) == 1  # one shared model


def test_sigterm_while_a_checkpoint_is_written_leaves_a_consistent_one(tmp_path: Path, monkeypatch):
    # a SIGTERM between the checkpoint's files (server state saved, state.json not yet) left a
    # server one round ahead of the round state.json names, and a resume trained it twice
    import os
    import signal

    from fedblend.signals import Interrupted, sigterm_interrupts
    from fedblend.store import rundir as rd

    run = rd.RunDir(tmp_path / "run")
    old = {"global": {"w": torch.zeros(2)}}
    run.save_checkpoint(1, old, {0: old}, {"n": 1})
    real_save = rd.save_state

    def save_then_sigterm(path, state, meta=None):
        real_save(path, state, meta)
        if path.name == "server.safetensors":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between two files of the set

    monkeypatch.setattr(rd, "save_state", save_then_sigterm)
    new = {"global": {"w": torch.ones(2)}}
    with pytest.raises(Interrupted), sigterm_interrupts():
        run.save_checkpoint(2, new, {0: new}, {"n": 2})  # the signal waits for the whole set
    server, clients, counters = run.load_checkpoint([0])
    state = json.loads((run.path / "checkpoint" / "state.json").read_text())
    assert state["rounds_completed"] == 2 and counters == {"n": 2}
    assert torch.equal(server["global"]["w"], torch.ones(2)) and torch.equal(clients[0]["global"]["w"], torch.ones(2))
