"""A real loopback deployment (SuperLink + 2 SuperNodes) against the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedblend.deploy.local import LocalDeployment, deploy_local
from fedblend.errors import FedblendError
from fedblend.store.rundir import RunDir

from .conftest import TINY, TINY_OVERRIDES
from .helpers import (
    assert_adapters_equal,
    assert_no_private_tensors,
    assert_same_predictions,
    inprocess_reference,
)

pytestmark = pytest.mark.flower


def test_feddpa_t_deployment_matches_inprocess_bit_for_bit(tmp_path: Path, fitted_tiny: list[str]) -> None:
    # FedDPA-T on the fitted model (answers not empty): global adapters FedAvg'd by the
    # ServerApp, local ones trained and kept on the nodes, instance-wise (dynamic) weights at
    # evaluation; every answer, weight and adapter equal to the in-process run's
    overrides = [*fitted_tiny, "algorithm='feddpa_t'", "feddpa.weighting='dynamic'"]
    summary, dep = deploy_local(TINY, 2, overrides, tmp_path / "flower", work=tmp_path / "work")
    assert dep.processes() == []  # nothing left behind: daemons, ServerApp, ClientApps, SuperExec
    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")

    run = RunDir(tmp_path / "flower")
    assert run.complete and json.loads((run.path / "status.json").read_text())["status"] == "complete"
    assert summary.keys() == ref.keys()
    assert summary["comm"] == ref["comm"]  # same wire format, same byte counts
    assert summary["clients"] == ref["clients"]
    assert len(run.rounds()) == 2 and (run.path / "report.html").is_file()
    assert_same_predictions(run.path, tmp_path / "inprocess")
    assert all("weight" in json.loads(x) for x in (run.path / "eval" / "predictions.jsonl").read_text().splitlines())
    assert_adapters_equal(run.path / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    for cid in (0, 1):  # the personal adapters, on the nodes
        node_run = next((tmp_path / "work" / "nodes" / f"node_{cid}").glob("run-*"))
        assert_adapters_equal(node_run / "adapters" / "local" / f"client_{cid}",
                              tmp_path / "inprocess" / "adapters" / "local" / f"client_{cid}")
    assert_no_private_tensors(run.path, ["global"], n_clients=2, rounds=2)
    engine = json.loads((run.path / "flower" / "engine.json").read_text())
    assert engine["backbone_load_s_per_message"]["n"] == 2 * 2 + 2


def test_failed_run_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    # a config the node cannot build: its reply is an error, the ServerApp fails the run
    # (`flwr run` still exits 0). One client for one SuperNode: with TINY_OVERRIDES' two
    # clients the ServerApp waited 300 s for a second SuperNode and failed for that instead.
    # the run must end failed: a hang (FedblendError "not finished after ...") does not pass
    with pytest.raises(FedblendError, match=r"run \d+ finished:failed"):
        deploy_local(TINY, 1, [*TINY_OVERRIDES, "data.num_clients=1", "lora.target_modules=['nope']"],
                     tmp_path / "bad", work=tmp_path / "work", timeout=480)
    assert LocalDeployment(1, tmp_path / "work").processes() == []
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["status"] == "failed"
    assert "nope" in status["error"] or "target" in status["error"], status["error"]


def test_gpus_pin_the_superlink_and_its_serverapp_to_the_first_listed_gpu(tmp_path: Path) -> None:
    # the ServerApp (started by the SuperLink's SuperExec, which inherits its environment)
    # loads the backbone; with --gpus 2,3 it must not land on GPU 0, outside the list
    import psutil

    dep = LocalDeployment(2, tmp_path / "work", gpus=[2, 3])
    with dep:
        dep.start(node_ids=range(0))  # the SuperLink alone
        link = next(d for d in dep.daemons if d.name == "superlink")
        assert psutil.Process(link.proc.pid).environ().get("CUDA_VISIBLE_DEVICES") == "2"
    assert dep.processes() == []
