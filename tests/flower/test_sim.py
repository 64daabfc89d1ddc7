"""Flower's simulation runtime (virtual SuperNodes on a private Ray) against the in-process engine."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import psutil
import pytest

from fedblend.store.rundir import RunDir

from .conftest import ROOT
from .helpers import (
    assert_adapters_equal,
    assert_same_predictions,
    inprocess_reference,
    received_messages,
)

# not importorskip: Ray reads some settings when imported, and deploy_sim imports it itself
pytestmark = [pytest.mark.flower,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="Flower's simulation runtime: pip install 'fedblend[simulation]'")]

FEDDPA_T = ROOT / "configs" / "tiny" / "feddpa_t.toml"


def test_simulation_matches_inprocess_with_private_state_by_partition(tmp_path: Path, fitted_tiny: list[str]) -> None:
    from fedblend.deploy.sim import deploy_sim

    # FedDPA-T on the fitted model (answers not empty): each client keeps a private local
    # adapter across rounds; 2 of 4 clients a round; a seeded sample of 2 clients evaluated
    overrides = [*fitted_tiny, "data.num_clients=4", "train.clients_per_round=2", "eval.clients=2"]
    work = tmp_path / "work"
    summary, res = deploy_sim(FEDDPA_T, 4, overrides, tmp_path / "sim", work=work, ray_cpus=2)
    ref = inprocess_reference(FEDDPA_T, overrides, tmp_path / "inprocess")

    run = RunDir(tmp_path / "sim")
    assert run.complete and (run.path / "report.html").is_file()
    assert summary["comm"] == ref["comm"]  # the same bytes up and down
    assert summary["clients"] == ref["clients"]  # the same sampled clients, the same scores
    assert summary["evaluation"] == ref["evaluation"]  # the same sample sizes, distribution, intervals
    assert summary["evaluation"]["mode"] == "sampled" and len(summary["clients"]) == 2
    assert summary["time"]["eval_instances"] == ref["time"]["eval_instances"]
    assert [r["clients"] for r in run.rounds()] == [r["clients"] for r in RunDir(tmp_path / "inprocess").rounds()]
    assert_adapters_equal(run.path / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    assert_same_predictions(run.path, tmp_path / "inprocess")
    for cid, path in summary["adapters"]["local"].items():  # exported where the client's state is
        assert Path(path).is_relative_to(work / "nodes"), path
        assert_adapters_equal(Path(path), tmp_path / "inprocess" / "adapters" / "local" / f"client_{cid}")
    received = received_messages(run.path)
    assert [m["type"] for m in received].count("train") == 2 * 2
    assert {r for m in received if m["type"] == "train" for r in m["roles"]} == {"global"}  # never "local"
    evals = {m["cid"]: m["records"]["configs"]["fedblend"] for m in received if m["type"] == "evaluate"}
    assert sorted(evals) == [0, 1, 2, 3]  # the final payload reached every client (the same bytes down)
    assert {c for c, keys in evals.items() if "eval" in keys} == {int(c) for c in summary["clients"]}  # scored: the sample

    # each Ray worker loaded the backbone once, not once per message
    messages = json.loads((run.path / "flower" / "engine.json").read_text())["messages"]
    loads = [m for m in messages if m.get("backbone_cached") == 0.0]
    assert res.actors == 2 and 1 <= len(loads) <= res.actors, loads
    assert sum(m.get("backbone_cached") == 1.0 for m in messages) == 2 * 2 + 4 - len(loads)
    # private state by client (= partition), on disk only
    (state_dir,) = (work / "nodes").glob("run-*")
    assert sorted(p.name for p in state_dir.glob("client_*.safetensors")) == [f"client_{c}.safetensors" for c in range(4)]

    # Ray stopped, and the environment it was started with is gone from this process
    assert "FEDBLEND_NODE_CONTEXT_STATE" not in os.environ
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDBLEND_NODE_DIR") == str(work / "nodes"):
                left.append(p.name())
        except psutil.Error:
            continue
    assert left == []


@pytest.mark.parametrize(("args", "says"), [
    (["--nodes", "5"], "--nodes 5: the config has 3 clients"),
    (["--cpus-per-client", "64", "--ray-cpus", "2"], "not one virtual node fits in 2 CPUs"),
])
def test_bad_arguments_fail_in_one_line_before_ray_starts(tmp_path: Path, args: list[str], says: str) -> None:
    from typer.testing import CliRunner

    from fedblend.cli import app

    res = CliRunner().invoke(app, ["deploy", "sim", str(ROOT / "configs" / "tiny" / "fedit.toml"),
                                   "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert says in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.sim").exists()
