"""Vision on the deployment engine: the tiny-CLIP TriplePlay config on 2 SuperNodes against
the in-process engine (same adapter, same accuracy, same bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedblend.deploy.local import deploy_local
from fedblend.store.rundir import RunDir

from .conftest import ROOT
from .helpers import assert_no_private_tensors, inprocess_reference

pytestmark = pytest.mark.flower

CLIP_SMOKE = ROOT / "configs" / "tiny" / "clip_smoke.toml"


def test_tripleplay_deployment_matches_inprocess(tmp_path: Path) -> None:
    overrides = ["data.num_clients=2", "engine.threads=1", "engine.progress=false",
                 f"vision.cache_dir='{tmp_path / 'cache'}'"]
    work = tmp_path / "work"
    summary, dep = deploy_local(CLIP_SMOKE, 2, overrides, tmp_path / "flower", work=work)
    assert dep.processes() == []
    # each SuperNode extracted and cached its own client's features in its own directory,
    # not in the configured (shared) cache_dir
    assert not (tmp_path / "cache" / "features").exists()
    for i in range(2):
        assert list((work / "nodes" / f"node_{i}" / "feature_cache" / "features").iterdir())
    ref = inprocess_reference(CLIP_SMOKE, overrides, tmp_path / "inprocess")

    run = RunDir(tmp_path / "flower")
    assert run.complete and (run.path / "report.html").is_file() and len(run.rounds()) == 2
    assert summary.keys() == ref.keys()
    assert summary["comm"] == ref["comm"]  # adapter and generator, same bytes both ways
    # every client, every class group; the centralized reference rows pool the clients' data,
    # which a deployment never does, so they exist in-process only
    assert summary["accuracy"]["reference"] is None and ref["accuracy"]["reference"] is not None
    strip = lambda acc: {k: v for k, v in acc.items() if k != "reference"}
    assert strip(summary["accuracy"]) == strip(ref["accuracy"])
    assert summary["per_class_accuracy"] == ref["per_class_accuracy"]
    assert summary["data"] == ref["data"] and summary["class_names"] == ref["class_names"]
    a = load_file(str(run.path / "adapters" / "global" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "inprocess" / "adapters" / "global" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert_no_private_tensors(run.path, ["global", "generator"], n_clients=2, rounds=2)
    assert summary["time"]["feature_cache"]["used"]
