"""`fedblend reproduce feddpa` end to end at a tiny budget: claims.json and report.html are
written, every claim gets a verdict, and the static-weight rows re-evaluate FedDPA-F's trained
states (the same adapters and bytes) instead of training again."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedblend.cli import app

TINY = ["model.source=tiny", "model.max_length=96", "data.kind=synthetic", "data.num_clients=6", "data.clients=[0, 1, 2, 3]",
        "data.synthetic_train_per_client=4", "data.synthetic_test_per_task=2", "train.rounds=1",
        "train.local_epochs=1", "train.batch_size=4", "train.micro_batch_size=4",
        "feddpa.finetune_epochs=0.5", "eval.max_new_tokens=2", "eval.max_per_task=2"]


def test_reproduce_feddpa_tiny_writes_claims_and_reevaluates_static_without_training(tmp_path: Path):
    out = tmp_path / "repro"
    args = ["reproduce", "feddpa", "--budget", "quick", "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "claims.json").read_text())
    assert doc["paper"] == "feddpa" and doc["budget"] == "quick" and len(doc["seeds"]) == 1
    verdicts = {c["verdict"] for c in doc["claims"]}
    assert doc["claims"] and verdicts <= {"agrees", "disagrees", "inconclusive"}
    assert any("static" in c["claim"] for c in doc["claims"])
    assert "FedDPA" in (out / "report.html").read_text()

    trained = next((out / "runs" / "feddpa_f").iterdir())
    static = out / "runs" / "feddpa_f_static" / trained.name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (trained, static))
    assert b["evaluated_from"] == str(trained) and a["weighting"]["mode"] == "dynamic"
    assert b["weighting"] == {"mode": "static", "convention": "intent"}
    assert b["comm"] == a["comm"] and b["time"]["train_s"] == a["time"]["train_s"]  # not trained again
    assert b["rounds"] == a["rounds"]
    assert not (static / "checkpoint").exists()  # no round ran
    assert (static / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
    for role in ("global", "local/client_0"):  # the exported adapters: the trained ones
        ta, tb = (load_file(str(d / "adapters" / role / "adapter_model.safetensors")) for d in (trained, static))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
