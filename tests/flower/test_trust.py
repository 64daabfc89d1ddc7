"""Trust on Flower (issue 10): a SuperNode killed mid-round is left out after engine.round_timeout;
a ServerApp killed mid-run resumes from its checkpoint to the uninterrupted result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from fedblend.deploy.local import LocalDeployment, app_dir, deploy_local
from fedblend.engines.flower.faults import KILL_NODE_ENV, KILL_SERVER_ENV
from fedblend.store.rundir import RunDir

from .conftest import TINY, TINY_OVERRIDES
from .helpers import assert_adapters_equal, assert_same_predictions, inprocess_reference

pytestmark = pytest.mark.flower


def test_killed_supernode_is_left_out_after_round_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # client 2's ClientApp SIGKILLs its SuperNode (and the SuperNode's children, itself
    # included) as round 0's training starts: the node never answers again. Each training
    # round leaves it out after the timeout; the SuperLink itself declares it dead only after
    # two missed heartbeats (2 x 30 s in Flower 1.41), and the final evaluation, which waits
    # for slow nodes, leaves it out then. A healthy tiny round takes a few seconds on an idle
    # machine; on a heavily loaded one a healthy node may be dropped from a training round
    # too, which the assertions below allow.
    timeout = 20
    overrides = [*TINY_OVERRIDES, "data.num_clients=3", f"engine.round_timeout={timeout}"]
    monkeypatch.setenv(KILL_NODE_ENV, "2:0")
    summary, dep = deploy_local(TINY, 3, overrides, tmp_path / "flower", work=tmp_path / "work", timeout=900)
    assert dep.processes() == []
    log = (tmp_path / "work" / "logs" / "supernode_2.log").read_text()
    assert "Start `flwr-clientapp` process" in log and "Traceback" not in log  # killed, not crashed

    run = RunDir(tmp_path / "flower")
    assert run.complete and len(run.rounds()) == 2
    left_out = f"timeout after {timeout} s"
    r0, r1 = run.rounds()
    assert r0["clients"] == r1["clients"] == [0, 1, 2]
    assert r0["dropped"]["2"] == left_out
    assert r0["seconds"] >= timeout, r0["seconds"]  # it waited for the timeout (no upper bound: load)
    for r in (r0, r1):  # the others were aggregated, the dead node left out of both rounds
        assert 2 not in r["answered"] and "2" not in r["client_metrics"]
        assert set(r["answered"]) | {int(c) for c in r["dropped"]} == {0, 1, 2}
    assert "Node Unavailable" in summary["eval_dropped"]["2"]
    assert summary["eval_dropped"].keys() == {"2"}
    assert sorted(int(c) for c in summary["clients"]) == [0, 1]
    engine = json.loads((run.path / "flower" / "engine.json").read_text())
    assert {"type": "train", "round": "0", "cid": 2, "dropped": left_out} in engine["messages"]


def _serverapp_alive(dep: LocalDeployment) -> bool:
    for p in dep.processes():
        try:
            if any("flwr-serverapp" in part for part in p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def test_killed_serverapp_resumes_to_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fitted_tiny: list[str]
) -> None:
    overrides = [*fitted_tiny, "algorithm='feddpa_t'"]
    out, work = tmp_path / "flower", tmp_path / "work"
    ckpt = out / "checkpoint" / "state.json"
    # the ServerApp SIGKILLs itself once round 1's updates arrived: the nodes have trained
    # round 1 (state after 2 rounds on disk), the server's checkpoint holds round 0 only
    monkeypatch.setenv(KILL_SERVER_ENV, "1")
    dep = LocalDeployment(2, work)
    with dep:
        dep.submit(app_dir(), {"config": str(TINY), "overrides": ";".join(overrides), "out": str(out)})
        deadline = time.monotonic() + 300
        while not (ckpt.is_file() and not _serverapp_alive(dep)):
            assert time.monotonic() < deadline, "the ServerApp did not stop after round 1"
            time.sleep(1)
    assert json.loads(ckpt.read_text())["rounds_completed"] == 1
    assert json.loads((out / "status.json").read_text())["status"] == "running"  # killed, not failed
    node_runs = [next((work / "nodes" / f"node_{i}").glob("run-*")) for i in (0, 1)]
    for i, nr in enumerate(node_runs):
        assert (nr / "snapshots" / f"client_{i}.r2.safetensors").is_file()  # ahead of the server

    monkeypatch.delenv(KILL_SERVER_ENV)
    summary, dep2 = deploy_local(TINY, 2, overrides, out, work=work, timeout=300, resume=True)
    assert dep2.processes() == []
    assert summary["resumed_at_round"] == 1

    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")
    run = RunDir(out)
    assert [r["round"] for r in run.rounds()] == [0, 1]
    assert summary["comm"] == ref["comm"] and summary["clients"] == ref["clients"]
    assert_same_predictions(out, tmp_path / "inprocess")
    assert_adapters_equal(out / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    for i, nr in enumerate(node_runs):
        assert [p.name for p in nr.parent.glob("run-*")] == [nr.name]  # the same state dir
        trains = [json.loads(x) for x in (nr / "node.jsonl").read_text().splitlines() if '"train"' in x]
        assert [(t["round"], t["state_round"]) for t in trains] == [(0, 0), (1, 1), (1, 1)]
        assert trains[2]["state_from"] == "disk"  # rolled back to the snapshot, not the newer state
        assert_adapters_equal(  # personal adapters: round 1 retrained from round 0's state
            nr / "adapters" / "local" / f"client_{i}",
            tmp_path / "inprocess" / "adapters" / "local" / f"client_{i}",
        )
