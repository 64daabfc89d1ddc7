"""FedALT over a real loopback deployment (SuperLink + 2 SuperNodes) against the in-process
engine: the family's richest private state (individual LoRA, router, rest-of-world LoRA) stays
on the nodes and ends equal bit for bit to the in-process run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedblend.deploy.local import deploy_local
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


def test_fedalt_deployment_matches_inprocess_bit_for_bit(tmp_path: Path, fitted_tiny: list[str]) -> None:
    overrides = [*fitted_tiny, "algorithm='fedalt'"]
    summary, dep = deploy_local(TINY, 2, overrides, tmp_path / "flower", work=tmp_path / "work")
    assert dep.processes() == []
    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")

    run = RunDir(tmp_path / "flower")
    assert run.complete and json.loads((run.path / "status.json").read_text())["status"] == "complete"
    assert summary["comm"] == ref["comm"]  # same wire format, same byte counts
    assert summary["clients"] == ref["clients"]
    assert_same_predictions(run.path, tmp_path / "inprocess")
    # only the individual LoRAs travel up; routers and RoWs never leave a node
    assert_no_private_tensors(run.path, ["individual"], n_clients=2, rounds=2)
    for cid in (0, 1):
        node_run = next((tmp_path / "work" / "nodes" / f"node_{cid}").glob("run-*"))
        on_node = load_state(node_run / f"client_{cid}.safetensors")
        here = load_state(tmp_path / "inprocess" / "final" / "clients" / f"{cid}.safetensors")
        assert set(on_node) == set(here) == {"local", "router", "row"}
        for role in here:
            assert all(torch.equal(on_node[role][k], here[role][k]) for k in here[role]), role
        assert_adapters_equal(node_run / "adapters" / "local" / f"client_{cid}",
                              tmp_path / "inprocess" / "adapters" / "local" / f"client_{cid}")
