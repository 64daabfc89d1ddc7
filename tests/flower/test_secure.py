"""TLS + SuperNode authentication; personal (local) adapters stay and persist on the nodes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedblend.deploy.certs import make_certs
from fedblend.deploy.local import LocalDeployment, app_dir
from fedblend.store.files import load_state
from fedblend.store.rundir import RunDir

from .conftest import TINY
from .helpers import (
    assert_adapters_equal,
    assert_no_private_tensors,
    assert_same_predictions,
    inprocess_reference,
)

pytestmark = pytest.mark.flower


def test_tls_auth_local_adapters_stay_on_nodes(tmp_path: Path, fitted_tiny: list[str]) -> None:
    overrides = [*fitted_tiny, "algorithm='local'"]
    certs = make_certs(tmp_path / "certs", nodes=3)  # node 2 is never registered
    out = tmp_path / "flower"
    dep = LocalDeployment(2, tmp_path / "work", certs=certs, auth=True)
    with dep:
        run_id = dep.submit(app_dir(), {"config": str(TINY), "overrides": ";".join(overrides),
                                        "out": str(out)})
        status = dep.wait(run_id, 300)
        intruder = dep.start_node(2, partition=0)
        # the SuperLink refuses the unregistered key and the SuperNode gives up by itself
        # (exits non-zero); the timeout only guards against a hang
        try:
            intruder_rc = intruder.proc.wait(timeout=600)  # read before teardown kills anything
        except subprocess.TimeoutExpired:
            intruder_rc = None
        log = intruder.log.read_text(errors="replace").lower()
    assert dep.processes() == []
    assert str(status["status"]).endswith("completed"), status
    assert intruder_rc is not None and intruder_rc > 0, (intruder_rc, log[-2000:])
    assert "failed to activate supernode" in log, log[-2000:]

    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")
    run = RunDir(out)
    summary = run.summary()
    assert summary["clients"] == ref["clients"] and summary["comm"] == ref["comm"]
    assert_same_predictions(run.path, tmp_path / "inprocess")
    assert_no_private_tensors(run.path, [], n_clients=2, rounds=2)
    assert not (run.path / "adapters" / "local").exists()  # local adapters live on the nodes
    for cid in (0, 1):
        node_run = next((tmp_path / "work" / "nodes" / f"node_{cid}").glob("run-*"))
        log_lines = (node_run / "node.jsonl").read_text().splitlines()
        assert ['"state_from": "init"' in x for x in log_lines] == [True, False, False]
        assert all('"state_from": "context"' in x for x in log_lines[1:])
        assert "local" in load_state(node_run / f"client_{cid}.safetensors")
        assert_adapters_equal(  # round 2 trained on round 1's adapter, exactly as in-process
            node_run / "adapters" / "local" / f"client_{cid}",
            tmp_path / "inprocess" / "adapters" / "local" / f"client_{cid}",
        )
