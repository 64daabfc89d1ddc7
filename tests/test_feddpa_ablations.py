"""FedDPA-T ablations: the official "glocal" global phase, separate local-phase epochs, and
the inference-weighting sweep scored from one trained state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment
from fedblend.sweep import parse_sweep, settings
from fedblend.text.trainer import TextTrainer


def test_glocal_global_phase_and_local_phase_epochs(tmp_path: Path, monkeypatch):
    calls = []
    original = TextTrainer.train

    def spy(self, key, examples, trainable, mix, epochs, seed, **kw):
        before = {r: self.adapters.get(r) for r in ("global", "local")}
        stats = original(self, key, examples, trainable, mix, epochs, seed, **kw)
        after = {r: self.adapters.get(r) for r in ("global", "local")}
        calls.append((list(trainable), dict(mix), stats["steps"], before, after))
        return stats

    monkeypatch.setattr(TextTrainer, "train", spy)
    # 8 examples per client, batch 4: 2 steps per epoch
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t", train={"rounds": 2}, feddpa={
        "global_phase_mix": 0.5, "local_phase_epochs": 2}))
    run_experiment(cfg, tmp_path / "glocal")
    round0, round1 = calls[:3], calls[3:]
    assert all(c[0] == ["global"] and c[1] == {"global": 1.0} and c[2] == 2 for c in round0)
    local_phase = [c for c in round1 if c[0] == ["local"]]
    global_phase = [c for c in round1 if c[0] == ["global"]]
    assert len(local_phase) == len(global_phase) == 3
    assert all(c[2] == 4 for c in local_phase)  # local_phase_epochs = 2
    assert all(c[2] == 2 for c in global_phase)  # the global phase keeps local_epochs = 1
    for trainable, mix, _, before, after in global_phase:
        assert mix == {"global": 0.5, "local": 0.5}  # L active at 0.5 beside G
        assert all(torch.equal(before["local"][k], after["local"][k]) for k in before["local"])  # L frozen
        assert any(not torch.equal(before["global"][k], after["global"][k]) for k in before["global"])
        assert any(t.abs().sum() > 0 for k, t in before["local"].items() if ".lora_B." in k)  # L is not zero
    # the progress total counts both phases' steps
    from fedblend.algorithms import make_algorithm

    assert make_algorithm(cfg).update_steps(8, 1, _Steps()) == 6


class _Steps:
    def train_steps(self, n: int, epochs: float) -> int:
        return int(epochs * n / 4)


def test_glocal_is_off_by_default():
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t"))
    assert cfg.section("feddpa").global_phase_mix == 0 and cfg.section("feddpa").local_phase_epochs == 0
    with pytest.raises(ConfigError, match="feddpa.global_phase_mix"):
        config_from_dict(tiny_raw(algorithm="feddpa_t"), ["feddpa.global_phase_mix=1.5"])


def test_sweep_grid_and_errors():
    axes = parse_sweep(["feddpa.dynamic_lambda=0.3,0.7", "feddpa.dynamic_top_k=1,3"])
    assert settings(axes) == [
        ["feddpa.dynamic_lambda=0.3", "feddpa.dynamic_top_k=1"], ["feddpa.dynamic_lambda=0.3", "feddpa.dynamic_top_k=3"],
        ["feddpa.dynamic_lambda=0.7", "feddpa.dynamic_top_k=1"], ["feddpa.dynamic_lambda=0.7", "feddpa.dynamic_top_k=3"],
    ]
    with pytest.raises(ConfigError, match="only settings that change inference only"):
        parse_sweep(["train.rounds=1,2"])
    with pytest.raises(ConfigError, match="expected section.key=value1,value2"):
        parse_sweep(["feddpa.dynamic_lambda"])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_weighting_sweep_rescores_one_trained_state(tmp_path: Path):
    src = tmp_path / "dpa"
    trained = run_experiment(config_from_dict(tiny_raw(algorithm="feddpa_t")), src)
    runner = CliRunner()
    out = tmp_path / "sweep"
    args = ["evaluate", str(src), "--sweep", "feddpa.dynamic_lambda=0.2,0.8", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "dynamic_lambda=0.2" in res.output and "dynamic_lambda=0.8" in res.output
    table = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["dynamic_lambda=0.2", "dynamic_lambda=0.8"]
    subs = [Path(r["run_dir"]) for r in table["rows"]]
    weights = []
    for sub in subs:
        summary = json.loads((sub / "summary.json").read_text())
        assert summary["evaluated_from"] == str(src)
        assert summary["comm"] == trained["comm"]  # nothing trained, nothing sent again
        assert json.loads((sub / "metrics.jsonl").read_text().splitlines()[0]) == \
            json.loads((src / "metrics.jsonl").read_text().splitlines()[0])
        # the adapters each setting scored are the trained run's, bit for bit
        for rel in ["adapters/global", *(f"adapters/local/client_{c}" for c in range(3))]:
            a, b = _tensors(src / rel), _tensors(sub / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        weights.append(summary["instance_weights"]["own_task"]["mean"])
    # w = lambda * similarity, from the same embeddings: the weights scale with lambda alone
    assert weights[1] / weights[0] == pytest.approx(0.8 / 0.2, rel=1e-4)
    bad = runner.invoke(app, ["evaluate", str(src), "--sweep", "feddpa.dynamic_lambda=0.5,2", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--sweep feddpa.dynamic_lambda=2: Input should be less than or equal to 1" in bad.output
    assert not (tmp_path / "b" / "dynamic_lambda=0.5").exists()  # refused before evaluating anything
    # a second call reuses the finished settings; show prints the table
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "reused finished re-evaluations" in again.output
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "dynamic_lambda=0.8" in shown.output
