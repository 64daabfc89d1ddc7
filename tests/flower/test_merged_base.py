"""The family that changes the frozen base weights (FLoRA, FedEx-LoRA) on a real loopback
deployment: FedEx-LoRA on 2 SuperNodes equals the in-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedblend.deploy.local import deploy_local
from fedblend.store.rundir import RunDir

from .conftest import TINY
from .helpers import (
    assert_adapters_equal,
    assert_no_private_tensors,
    assert_same_predictions,
    inprocess_reference,
)

pytestmark = pytest.mark.flower


def test_fedex_lora_deployment_matches_inprocess(tmp_path: Path, fitted_tiny: list[str]) -> None:
    # each SuperNode keeps its base-weight delta in its private state between rounds (round 1
    # brings round 0's residual); the ServerApp exports the delta from its own cumulative copy
    overrides = [*fitted_tiny, "algorithm='fedex_lora'"]
    summary, dep = deploy_local(TINY, 2, overrides, tmp_path / "flower", work=tmp_path / "work")
    assert dep.processes() == []
    ref = inprocess_reference(TINY, overrides, tmp_path / "inprocess")
    run = RunDir(tmp_path / "flower")
    assert run.complete and len(run.rounds()) == 2
    assert summary["comm"] == ref["comm"]  # same payloads, increments and final sync included
    assert summary["clients"] == ref["clients"]
    assert summary["adapters"] == ref["adapters"]
    assert_same_predictions(run.path, tmp_path / "inprocess")
    assert_adapters_equal(run.path / "adapters" / "global", tmp_path / "inprocess" / "adapters" / "global")
    mine = load_file(str(run.path / "adapters" / "base_delta" / "base_delta.safetensors"))
    theirs = load_file(str(tmp_path / "inprocess" / "adapters" / "base_delta" / "base_delta.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(t.abs().sum() > 0 for t in mine.values())
    assert_no_private_tensors(run.path, ["global"], n_clients=2, rounds=2)
