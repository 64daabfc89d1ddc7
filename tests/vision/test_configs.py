"""Every shipped vision config loads; bad vision keys fail with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedblend.algorithms import names
from fedblend.config import config_from_dict, load_config
from fedblend.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "cifar10").glob("*.toml")) + [REPO / "configs" / "tiny" / "clip_smoke.toml"]


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"zeroshot_or_linear_probe", "fedclip", "tripleplay", "local", "fedprox", "clip_smoke"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.algorithm in names("vision") and cfg.modality == "vision"


def test_every_vision_algorithm_is_registered():
    assert {"zeroshot", "linear_probe", "fedclip", "tripleplay", "fedprox", "local_adapter",
            "fedavg_adapter"} <= set(names("vision"))


@pytest.mark.parametrize(("vision", "key"), [
    ({"adaptr": "attention"}, "vision.adaptr"),
    ({"prompt_template": "a photo"}, "vision.prompt_template"),
    ({"backbone": "clip"}, "vision.path"),
    ({"domains": ["none", "fog"]}, "vision.domains"),
    ({"federation": "domain", "unseen_domain": "blur", "domains": ["none", "noise"]}, "vision.unseen_domain"),
    ({"imbalance_factor": 0.5}, "vision.imbalance_factor"),
])
def test_bad_vision_config_names_the_key(vision, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"algorithm": "fedclip", "vision": vision})
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_fedprox_needs_mu():
    from fedblend.algorithms import make_algorithm

    with pytest.raises(ConfigError, match="fedprox.mu"):
        make_algorithm(config_from_dict({"algorithm": "fedprox"}))
