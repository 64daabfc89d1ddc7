"""TLS + SuperNode authentication; personal (local) adapters stay and persist on the nodes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedblend.deploy.certs import make_certs
from fedblend.deploy.local import LocalDeployment, app_dir
from fedblend.reports.rundir import RunDir, load_state

from .conftest import TINY, TINY_OVERRIDES
from .helpers import assert_adapters_close, assert_no_private_tensors, inprocess_reference

pytestmark = pytest.mark.flower

OVERRIDES = [*TINY_OVERRIDES, "algorithm='local'"]
REFUSED = ("denied", "unauthenticated", "not registered", "permission", "auth", "refused")


def test_tls_auth_local_adapters_stay_on_nodes(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", nodes=3)  # node 2 is never registered
    out = tmp_path / "flower"
    dep = LocalDeployment(2, tmp_path / "work", certs=certs, auth=True)
    with dep:
        run_id = dep.submit(app_dir(), {"config": str(TINY), "overrides": ";".join(OVERRIDES),
                                        "out": str(out)})
        status = dep.wait(run_id, 300)
        intruder = dep.start_node(2, partition=0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and intruder.proc.poll() is None:
            if any(w in intruder.log.read_text(errors="replace").lower() for w in REFUSED):
                break
            time.sleep(1)
        log = intruder.log.read_text(errors="replace").lower()
        nodes = dep.flwr("supernode", "list", "fedblend-local", "--format", "json").stdout
    assert dep.processes() == []
    assert str(status["status"]).endswith("completed"), status
    assert intruder.proc.returncode not in (None, 0) or any(w in log for w in REFUSED), log[-2000:]
    assert nodes.count('"online"') <= 2 or "node_id" in nodes  # the intruder never joined

    ref = inprocess_reference(TINY, OVERRIDES, tmp_path / "inprocess")
    run = RunDir(out)
    summary = run.summary()
    assert summary["clients"] == ref["clients"] and summary["comm"] == ref["comm"]
    assert_no_private_tensors(run.path, [], n_clients=2, rounds=2)
    assert not (run.path / "adapters" / "local").exists()  # local adapters live on the nodes
    for cid in (0, 1):
        node_run = next((tmp_path / "work" / "nodes" / f"node_{cid}").glob("run-*"))
        log_lines = (node_run / "node.jsonl").read_text().splitlines()
        assert ['"state_from": "init"' in x for x in log_lines] == [True, False, False]
        assert all('"state_from": "context"' in x for x in log_lines[1:])
        assert "local" in load_state(node_run / f"client_{cid}.safetensors")
        assert_adapters_close(  # round 2 trained on round 1's adapter, exactly as in-process
            node_run / "adapters" / "local" / f"client_{cid}",
            tmp_path / "inprocess" / "adapters" / "local" / f"client_{cid}",
        )
