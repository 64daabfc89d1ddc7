"""Fixtures for loopback Flower deployments: skip without flwr, private FLWR_HOME, quiet env."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedblend.deploy.local import QUIET_ENV, flwr_bin

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny" / "fedit.toml"
# 2 clients, 2 rounds, small data: keeps a deployment under ~2 minutes on 2 shared cores
TINY_OVERRIDES = [
    "data.num_clients=2", "data.synthetic_train_per_client=8", "data.synthetic_test_per_task=2",
    "eval.max_new_tokens=4", "engine.threads=1", "engine.progress=false",
]


@pytest.fixture
def fitted_tiny(fitted_model: Path) -> list[str]:
    """TINY_OVERRIDES on the model fitted to the synthetic tasks: answers not empty, so a
    Flower-vs-in-process comparison compares real scores and predictions."""
    from fitted import fitted_overrides

    return [*TINY_OVERRIDES, *fitted_overrides(fitted_model)]


@pytest.fixture(autouse=True)
def _flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [b for b in ("flwr", "flower-superlink", "flower-supernode") if flwr_bin(b) is None]
    if missing:
        pytest.skip(f"Flower binaries missing: {', '.join(missing)}")
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home-default"))
    monkeypatch.setenv("FEDBLEND_NODE_DIR", str(tmp_path / "nodes-default"))
    monkeypatch.chdir(ROOT)
