"""The CI-sized soak (issue 23): 20 rounds of tiny FedDPA-T on a loopback deployment with TLS
and SuperNode authentication, one ServerApp SIGKILLed mid-round and resumed, two SuperNodes
SIGKILLed mid-round and restarted on their state directories. benchmarks/soak.py runs the same
soak at 200 rounds (benchmarks/results/soak.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedblend.deploy.soak import Soak
from fedblend.store.rundir import RunDir

from .conftest import ROOT

pytestmark = pytest.mark.flower

ROUNDS = 20
# a dead node is reported "Node Unavailable" once two 30 s heartbeats lapse, so a longer round
# timeout costs a kill nothing more, and keeps a healthy node on a loaded machine in its round
TIMEOUT = 60


def test_twenty_rounds_with_two_node_kills_and_a_server_kill_account_for_every_round(tmp_path: Path) -> None:
    # the ServerApp dies in round 3; SuperNodes 1 and 2 both die in round 6, so that their 60 s
    # wait to rejoin (Flower refuses a node id for two missed 30 s heartbeats) is paid once;
    # node 0 lives throughout
    soak = Soak(tmp_path / "deploy", tmp_path / "run", ROUNDS, TIMEOUT, seed=1, between=False,
                config=ROOT / "configs" / "tiny" / "feddpa_t.toml", nodes=3,
                node_rounds={6: (1, 2)}, server_rounds=[3])
    res = soak.run(deadline_s=2400)  # 1,269 s here at load average 10; about 5 min idle

    kills = [e for e in res["events"] if e["kind"] in ("node_kill", "server_kill")]
    assert [(e["kind"], e["round"], e.get("node")) for e in kills] == [
        ("server_kill", 3, None), ("node_kill", 6, 1), ("node_kill", 6, 2)]
    assert res["server_kills"] == 1 and res["node_kills"] == 2
    assert all("back_after_s" in e for e in kills if e["kind"] == "node_kill")  # both rejoined
    # every round logged once, numbered without gaps or repeats across the resume
    assert res["rounds_contiguous"] and res["rounds_logged"] == ROUNDS
    assert res["run_status"].startswith("finished:completed"), res["run_status"]
    run = RunDir(tmp_path / "run")
    assert run.complete and json.loads((run.path / "status.json").read_text())["status"] == "complete"
    summary = run.summary()
    assert summary["resumed_at_round"] is not None and summary["resumed_at_round"] <= 3
    # each round: its sampled clients = answered + dropped; the killed nodes' rounds drop them
    assert res["every_round_accounts_for_its_clients"]
    rows = {r["round"]: r for r in res["per_round"]}
    assert all(r["clients"] == [0, 1, 2] for r in rows.values())
    assert rows[6]["answered"] == [0] and set(rows[6]["dropped"]) == {"1", "2"}
    assert all(not r["dropped"] for k, r in rows.items() if k < 6 and k != 3), rows  # before the kills
    # both nodes came back under their node ids: a later round answered by all three
    assert any(r["answered"] == [0, 1, 2] for k, r in rows.items() if k > 7), rows
    # bounded node state: at most 2 snapshots per client a node keeps, no process left
    assert max(s["snapshots"] for s in res["samples"]) <= 2 * 3
    assert res["processes_left"] == 0, res["left"]
    assert soak.dep.processes() == []
