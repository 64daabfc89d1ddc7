"""Heterogeneous ranks on a loopback deployment (SuperLink + 2 SuperNodes): HetLoRA with
clients at ranks 2 and 1, against the in-process run (the one Flower test of FLoRA/FlexLoRA/
HetLoRA's family: each deployment costs CI about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedblend.deploy.local import deploy_local
from fedblend.store.files import load_state
from fedblend.store.rundir import RunDir

from .conftest import TINY
from .helpers import (
    assert_adapters_equal,
    assert_no_private_tensors,
    assert_same_predictions,
    inprocess_reference,
    received_messages,
)

pytestmark = pytest.mark.flower


def test_hetlora_ranks_2_and_1_deployment_matches_inprocess(tmp_path: Path, fitted_tiny: list[str]) -> None:
    # a strong penalty on the last rank component (gamma 0.5): clients may prune in round 1, and
    # each client is scored with its own rank's truncation (its rank in the node's state)
    overrides = [*fitted_tiny, "algorithm='hetlora'", "lora.r=2", "lora.client_ranks=[2, 1]",
                 "engine.checkpoint_every=1", "hetlora.gamma=0.5", "hetlora.lam=50.0",
                 "hetlora.evaluate='client'"]
    summary, dep = deploy_local(TINY, 2, overrides, tmp_path / "flower", work=tmp_path / "work")
    assert dep.processes() == []
    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")

    run = RunDir(tmp_path / "flower")
    assert run.complete and len(run.rounds()) == 2
    assert summary["comm"] == ref["comm"]  # rank-r_i payloads and uploads, counted alike
    assert summary["clients"] == ref["clients"]
    assert_same_predictions(run.path, tmp_path / "inprocess")
    assert_adapters_equal(run.path / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    assert_no_private_tensors(run.path, ["global"], n_clients=2, rounds=2)
    # the ServerApp screened each update against its client's rank: none rejected, and the
    # rank-1 client's upload is one rank component (half the rank-2 adapter's tensors) smaller;
    # the safetensors header (about 1.3 KB) is the same give or take a few digits
    assert all(r["rejected"] == {} for r in run.rounds())
    # (round 0: nobody prunes, its training starts from B = 0)
    ups = {m["cid"]: m["bytes"] for m in received_messages(run.path) if m["type"] == "train" and m["round"] == "0"}
    rank2 = sum(t.numel() * t.element_size() for t in
                load_file(str(run.path / "adapters" / "global" / "adapter_model.safetensors")).values())
    assert abs((ups[0] - ups[1]) - rank2 / 2) < 64, (ups, rank2)
    # the server's checkpoint holds each client's rank, as the in-process run's does
    ranks = [{k: int(v) for k, v in load_state(p / "checkpoint" / "v2" / "server.safetensors")["hetlora_ranks"].items()}
             for p in (run.path, tmp_path / "inprocess")]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"0", "1"}
    assert json.loads((run.path / "status.json").read_text())["status"] == "complete"
