"""Population scale (issue 19): the client state store, sampled evaluation, outputs that stay
readable, size checks and the signal rules. Tiny models and synthetic or tmp data only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.config import config_from_dict
from fedblend.runner import run_experiment
from fedblend.store.clients import ClientStore
from fedblend.store.files import load_state
from tests.conftest import tiny_raw


def _state(v: float) -> dict:
    return {"local": {"w": torch.full((3,), v)}}


# ---- the client state store ----------------------------------------------------------------
def test_store_reads_what_it_wrote_and_fresh_clients_from_init(tmp_path: Path):
    store = ClientStore(tmp_path / "s", init=lambda cid: _state(-cid))
    assert torch.equal(store[4]["local"]["w"], torch.full((3,), -4.0))  # never written: init
    assert store.loads == 0 and 4 not in store
    store.version = 1
    store[4] = _state(1.0)
    store.version = 2
    store[4] = _state(2.0)
    assert torch.equal(store[4]["local"]["w"], torch.full((3,), 2.0))
    assert list(store) == [4] and store.loads == 1
    # the pointer is the file a reader of the old layout opens
    assert torch.equal(load_state(tmp_path / "s" / "4.safetensors")["local"]["w"], torch.full((3,), 2.0))


_KILL = textwrap.dedent("""
    import os, sys, torch
    from fedblend.store import clients as c
    store = c.ClientStore(sys.argv[1])
    store.version = 1
    store[0] = {"local": {"w": torch.ones(2)}}
    where = sys.argv[2]
    real_save, real_replace = c.save_state, os.replace
    def save(path, state, meta=None):
        if where == "version":  # killed while the new version's temporary file is half written
            (path.parent / f".{path.name}.tmp").write_bytes(b"partial")
            os._exit(9)
        real_save(path, state, meta)
    def replace(src, dst):
        if where == "pointer" and str(dst).endswith("0.safetensors"):
            os._exit(9)  # the new version is in place, the pointer not yet switched
        real_replace(src, dst)
    c.save_state, c.os.replace = save, replace
    store.version = 2
    store[0] = {"local": {"w": torch.full((2,), 2.0)}}
""")


@pytest.mark.parametrize("where", ["version", "pointer"])
def test_a_kill_between_the_store_writes_leaves_the_last_consistent_state(tmp_path: Path, where: str):
    root = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", _KILL, str(root), where],
                          check=False, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    store = ClientStore(root)
    assert store.current_version(0) == 1
    assert torch.equal(store[0]["local"]["w"], torch.ones(2))
    # the next write goes through, over the debris
    store.version = 2
    store[0] = {"local": {"w": torch.full((2,), 3.0)}}
    assert torch.equal(ClientStore(root)[0]["local"]["w"], torch.full((2,), 3.0))


def test_resume_reads_the_checkpointed_version_not_a_crashed_rounds(tmp_path: Path):
    store = ClientStore(tmp_path / "s")
    for v in (1, 2, 3):
        store.committed = 2 if v == 3 else v  # round 3 crashed before its checkpoint
        store.version = v
        store[0] = _state(float(v))
    assert store.versions(0) == [2, 3]  # v1 collected; v2 kept for a resume
    resumed = ClientStore(tmp_path / "s")
    resumed.limit = resumed.committed = 2
    assert torch.equal(resumed[0]["local"]["w"], torch.full((3,), 2.0))
    resumed.version = 3
    resumed[0] = _state(33.0)  # the round re-run: now its own write is read
    assert torch.equal(resumed[0]["local"]["w"], torch.full((3,), 33.0))


def test_only_the_sampled_clients_states_are_loaded_in_a_round(tmp_path: Path, monkeypatch):
    loaded: list[tuple[int, int]] = []
    real = ClientStore.__getitem__

    def spy(self, cid):
        loaded.append((self.version, cid))
        return real(self, cid)

    monkeypatch.setattr(ClientStore, "__getitem__", spy)
    from fedblend import runner

    real_send = runner.send_final

    def mark(*a, **kw):
        loaded.append((-1, -1))  # the rounds are over: every client finishes now
        return real_send(*a, **kw)

    monkeypatch.setattr(runner, "send_final", mark)
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t", data={"num_clients": 5},
                                    train={"clients_per_round": 2, "rounds": 3}, eval={"ttp": False}))
    out = tmp_path / "run"
    run_experiment(cfg, out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    in_rounds = loaded[:loaded.index((-1, -1))]
    for r in rounds:
        during = sorted(cid for v, cid in in_rounds if v == r["round"] + 1)
        assert during == r["clients"]  # round r reads exactly its 2 sampled clients
    # a client sampled twice reads back what it wrote: the store holds it, not memory
    store_dir = out / "clients"
    ever = {c for r in rounds for c in r["clients"]}
    assert {int(p.name.split(".")[0]) for p in store_dir.glob("*.safetensors")} == ever


# ---- evaluation with a budget ----------------------------------------------------------------
def test_sampled_evaluation_equals_the_exact_protocol_when_it_samples_everything(tmp_path: Path):
    base = {"algorithm": "feddpa_t"}
    exact = run_experiment(config_from_dict(tiny_raw(**base)), tmp_path / "exact")
    # also scored every round (eval.every): which must leave the training untouched
    sampled = run_experiment(config_from_dict(tiny_raw(**base, eval={"clients": 3, "ttp_tasks": 5, "every": 1})),
                             tmp_path / "sampled")
    assert [r["round"] for r in sampled["p_per_round"]] == [1, 2] and exact["p_per_round"] is None
    assert all(r["lo"] <= r["P"] <= r["hi"] and r["clients"] == 3 for r in sampled["p_per_round"])
    assert "every k rounds" in (tmp_path / "sampled" / "report.html").read_text()
    assert exact["evaluation"]["mode"] == "exact" and exact["evaluation"]["interval"] is None
    ev = sampled["evaluation"]
    assert ev["mode"] == "sampled" and ev["clients"] == 3 and ev["clients_evaluated"] == 3
    assert ev["ttp"] == "tasks" and ev["ttp_other_tasks_per_client"] == 2
    for cid, c in exact["clients"].items():
        assert sampled["clients"][cid]["P"] == c["P"]
        assert sampled["clients"][cid]["TTP"] == pytest.approx(c["TTP"], abs=1e-12)
    assert sampled["mean"]["TTP"] == pytest.approx(exact["mean"]["TTP"], abs=1e-12)
    for key in ("P", "TTP"):
        assert ev[key]["lo"] <= sampled["mean"][key] <= ev[key]["hi"] and ev[key]["clients"] == 3


def _sst_like(root: Path, n_train: int, n_test: int = 40) -> Path:
    d = root / "sst"
    d.mkdir()
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    for name, n in (("train.tsv", n_train), ("test.tsv", n_test)):
        rows = ["sentence\tlabel"] + [f"{words[i % 6]} film number {i}\t{i % 2}" for i in range(n)]
        (d / name).write_text("\n".join(rows) + "\n")
    return d


def _skew_raw(data_dir: Path, n: int, **eval_) -> dict:
    return tiny_raw(
        data={"kind": "tsv", "dir": str(data_dir), "layout": "label_skew", "num_clients": n,
              "train_file": "train.tsv", "test_file": "test.tsv", "label_names": ["negative", "positive"]},
        train={"clients_per_round": 4, "rounds": 2},
        eval={"max_per_task": 2, "exact_max_clients": 10, "pooled_test": 12, **eval_},
    )


def test_a_large_label_skew_federation_is_evaluated_on_a_seeded_sample(tmp_path: Path):
    data = _sst_like(tmp_path, 240)
    s = run_experiment(config_from_dict(_skew_raw(data, 60)), tmp_path / "a")
    ev = s["evaluation"]
    assert ev["mode"] == "sampled" and ev["clients"] == 60 and ev["clients_evaluated"] == 10
    assert ev["ttp"] == "pooled" and ev["pooled_test_instances"] == 12
    assert len(s["clients"]) == 10 and s["data"]["train_examples"]["n"] == 60
    for c in s["clients"].values():
        assert set(c["by_task"]) == {c["task"], "pooled"} and c["TTP"] == c["by_task"]["pooled"]
    for key in ("P", "TTP"):
        assert ev[key]["lo"] <= s["mean"][key] <= ev[key]["hi"]
        assert sum(ev["distribution"][key]["histogram"]["counts"]) == 10
    lines = (tmp_path / "a" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert 10 * 12 < len(lines) <= 10 * (2 + 12)  # own task (<= 2) and the pooled set, per evaluated client
    assert {json.loads(x)["client"] for x in lines} == {int(c) for c in s["clients"]}
    # seeded: the same sample again, another with another seed
    again = run_experiment(config_from_dict(_skew_raw(data, 60)), tmp_path / "b")
    assert list(again["clients"]) == list(s["clients"]) and again["mean"] == s["mean"]
    other = run_experiment(config_from_dict({**_skew_raw(data, 60), "seed": 4}), tmp_path / "c")
    assert list(other["clients"]) != list(s["clients"])
    html = (tmp_path / "a" / "report.html").read_text()
    assert "client-by-task scores" not in html  # each client's tasks are its own sample: no grid


@pytest.mark.parametrize("eval_", [{}, {"clients": 3}, {"clients": 3, "pooled_test": 0}, {"exact_max_clients": 0}])
def test_a_server_without_data_draws_the_same_sample_and_rebuilds_the_plan_from_replies(tmp_path: Path, eval_):
    """The Flower ServerApp holds no data: it draws the evaluated clients from the client ids
    alone, and rebuilds the plan's sizes from what each evaluated node reports (its plan's
    facts and the tasks it was scored on); both must equal the in-process plan."""
    from fedblend.text.federation import build_federation
    from fedblend.text.protocol import EvalPlan, eval_plan, eval_sample

    cfg = config_from_dict(_skew_raw(_sst_like(tmp_path, 240), 12, **eval_))
    fed = build_federation(cfg)
    plan = eval_plan(cfg, fed)
    assert plan.sampled == ("clients" in eval_ or "exact_max_clients" not in eval_)
    assert eval_sample(cfg, [c.cid for c in reversed(fed.clients)]) == (plan.clients if plan.sampled else None)
    facts = json.loads(json.dumps(plan.facts()))  # as it travels
    rebuilt = EvalPlan.from_replies(len(fed.clients), facts, {c: list(ts) for c, ts in plan.tasks.items()})
    assert rebuilt.record() == plan.record()
    assert rebuilt.record()["pooled_test_instances"] == (12 if plan.ttp == "pooled" else 0)


def test_the_terminal_and_report_show_a_distribution_for_many_clients(tmp_path: Path, capsys):
    from fedblend.console import print_summary

    data = _sst_like(tmp_path, 240)
    s = run_experiment(config_from_dict(_skew_raw(data, 60, clients=35, exact_max_clients=0)), tmp_path / "a")
    print_summary(s)
    out = " ".join(capsys.readouterr().out.split())
    assert "a seeded sample of 35 of 60 clients" in out and "per-client P" in out
    assert out.count("client") < 10  # no row per client
    html = (tmp_path / "a" / "report.html").read_text()
    assert "per-client P and TTP" in html and "P and TTP per client" not in html and "95% interval" in html


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("train.clients_per_round=4", ["train.clients_per_round", "4", "3 clients"]),
    ("eval.clients=7", ["eval.clients", "7", "3 clients"]),
])
def test_sizes_that_do_not_fit_the_federation_are_one_line_errors(tmp_path: Path, override, words):
    cfg = tmp_path / "c.toml"
    import tomli_w

    cfg.write_text(tomli_w.dumps(tiny_raw()))
    res = CliRunner().invoke(app, ["run", str(cfg), "--set", override, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


def test_more_clients_than_the_data_can_fill_is_a_one_line_error(tmp_path: Path):
    import tomli_w

    data = _sst_like(tmp_path, 20)
    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(_skew_raw(data, 30)))
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "data.num_clients" in line and "30 clients > 20 training examples" in line, line


# ---- signals -------------------------------------------------------------------------------
def test_a_sigterm_after_the_summary_leaves_the_run_complete(tmp_path: Path, monkeypatch):
    from fedblend import rounds
    from fedblend.signals import Interrupted, sigterm_interrupts

    real = rounds.complete_run

    def complete_then_sigterm(run, summary):
        real(run, summary)
        os.kill(os.getpid(), signal.SIGTERM)  # while the outputs are rendered, say

    monkeypatch.setattr("fedblend.runner.complete_run", complete_then_sigterm)
    out = tmp_path / "run"
    with pytest.raises(Interrupted), sigterm_interrupts():
        run_experiment(config_from_dict(tiny_raw()), out)
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


_HANG = textwrap.dedent("""
    import hashlib
    import threading
    from fedblend.signals import sigterm_interrupts
    with sigterm_interrupts():
        # "ready" comes from another thread a second after the main thread entered the call, so
        # the signal lands inside it (printed before the call, it could land before it)
        threading.Timer(1.0, lambda: print("ready", flush=True)).start()
        # minutes in native code that releases the interpreter and never checks for signals
        # (as a long torch call): Python's handler cannot run until it returns
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)
""")


def test_sigterm_ends_the_process_even_inside_a_long_native_call(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", _HANG], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143  # a hang guard only: it ends after signals.EXIT_WITHIN_S


def test_sigterm_mid_run_ends_the_cli_process(tmp_path: Path):
    import time

    import tomli_w

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(tiny_raw(train={"rounds": 30})))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedblend.cli", "run", str(cfg), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"


def test_iid_partitions_are_flwr_datasets_iid_partitions():
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    from fedblend.partition import partition_by_label
    from fedblend.text.sources import Example

    for n, k, seed in ((50, 7, 3), (23, 23, 0), (101, 10, 42)):
        items = [Example(f"x{i}", str(i % 3), "", str(i % 3)) for i in range(n)]
        ds = Dataset.from_dict({"label": [e.label for e in items], "idx": list(range(n))}).shuffle(seed=seed)
        part = IidPartitioner(num_partitions=k)
        part.dataset = ds
        assert partition_by_label(items, k, "iid", seed, 0.5, 2) == [list(part.load_partition(i)["idx"]) for i in range(k)]
