"""Trust on Flower (issue 10): a stalled SuperNode is left out after engine.round_timeout;
a ServerApp killed mid-run resumes from its checkpoint to the uninterrupted result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from fedblend.deploy.local import LocalDeployment, app_dir, deploy_local
from fedblend.engines.flower.faults import KILL_SERVER_ENV, STALL_ENV
from fedblend.reports.rundir import RunDir

from .conftest import TINY, TINY_OVERRIDES
from .helpers import assert_adapters_close, inprocess_reference

pytestmark = pytest.mark.flower


def test_stalled_supernode_is_left_out_after_round_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a healthy tiny round takes a few seconds on an idle machine; on a heavily loaded one a
    # healthy node may be dropped too, which the assertions below allow
    timeout, stall = 20, 35
    overrides = [*TINY_OVERRIDES, "data.num_clients=3", f"engine.round_timeout={timeout}"]
    monkeypatch.setenv(STALL_ENV, f"2:0:{stall}")  # client 2 stalls before training round 0
    summary, dep = deploy_local(TINY, 3, overrides, tmp_path / "flower", work=tmp_path / "work", timeout=900)
    assert dep.processes() == []

    run = RunDir(tmp_path / "flower")
    assert run.complete and len(run.rounds()) == 2
    r0 = run.rounds()[0]
    assert r0["clients"] == [0, 1, 2]
    assert r0["dropped"]["2"] == f"timeout after {timeout} s"
    assert 2 not in r0["answered"] and "2" not in r0["client_metrics"]
    assert set(r0["answered"]) | {int(c) for c in r0["dropped"]} == {0, 1, 2}
    # the round ended at the timeout, not when the stalled node woke up
    assert timeout <= r0["seconds"] < stall, r0["seconds"]
    # node 2 caught up afterwards and was evaluated with the others
    assert len(summary["clients"]) == 3
    engine = json.loads((run.path / "flower" / "engine.json").read_text())
    dropped = {"type": "train", "round": "0", "cid": 2, "dropped": f"timeout after {timeout} s"}
    assert dropped in engine["messages"]


def _serverapp_alive(dep: LocalDeployment) -> bool:
    for p in dep.processes():
        try:
            if any("flwr-serverapp" in part for part in p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def test_killed_serverapp_resumes_to_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*TINY_OVERRIDES, "algorithm='feddpa_t'"]
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
    assert_adapters_close(out / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    for i, nr in enumerate(node_runs):
        assert [p.name for p in nr.parent.glob("run-*")] == [nr.name]  # the same state dir
        trains = [json.loads(x) for x in (nr / "node.jsonl").read_text().splitlines() if '"train"' in x]
        assert [(t["round"], t["state_round"]) for t in trains] == [(0, 0), (1, 1), (1, 1)]
        assert trains[2]["state_from"] == "disk"  # rolled back to the snapshot, not the newer state
        assert_adapters_close(  # personal adapters: round 1 retrained from round 0's state
            nr / "adapters" / "local" / f"client_{i}",
            tmp_path / "inprocess" / "adapters" / "local" / f"client_{i}",
        )
