"""Every registered text method, as the registry lists it (a new one is covered without being
named here): a tiny run finishes and writes its run directory, and each trust feature either
composes with it (the run finishes) or is refused at load time in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_raw

from fedblend import algorithms
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment

TEXT = [n for n in algorithms.names("text")]
ONE_ROUND = {"train": {"rounds": 1, "local_epochs": 1}, "feddpa": {"finetune_epochs": 1}}


@pytest.mark.parametrize("name", TEXT)
def test_every_text_method_runs_a_tiny_round(tmp_path: Path, name: str) -> None:
    summary = run_experiment(config_from_dict(tiny_raw(algorithm=name, **ONE_ROUND)), tmp_path / name)
    assert summary["algorithm"] == name and (tmp_path / name / "summary.json").is_file()
    cls = algorithms.algorithm_class(name)
    tensor_bytes = 4 * min(summary["comm"]["adapter_params"].values())  # one adapter's LoRA
    if not cls.shared_roles:  # nothing but counts and metrics travel up
        assert summary["comm"]["bytes_up"] < tensor_bytes / 4
    else:  # at least a quarter of an adapter per client (FFA-LoRA and FedSA-LoRA send one factor)
        assert summary["comm"]["bytes_up"] >= 3 * tensor_bytes / 4
    assert set(summary["clients"]) and all("P" in c for c in summary["clients"].values())


@pytest.mark.parametrize("name", [n for n in TEXT if algorithms.algorithm_class(n).shared_roles
                                  and not algorithms.algorithm_class(n).pools_data])
@pytest.mark.parametrize("feature", [["comm.compress=int8"], ["aggregate.rule=median"], ["privacy.clip=1"]],
                         ids=["compress", "median", "dp_clip"])
def test_trust_features_compose_or_are_refused_in_one_line(tmp_path: Path, name: str, feature: list[str]) -> None:
    raw = tiny_raw(algorithm=name, **ONE_ROUND)
    try:
        cfg = config_from_dict(raw, feature)
    except ConfigError as e:
        key = feature[0].split("=")[0]
        assert f"--set {feature[0]}:" in str(e) and "\n" not in str(e), (key, str(e))
        assert not algorithms.algorithm_class(name).mean_aggregation or key == "comm.compress"
        return
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["algorithm"] == name
