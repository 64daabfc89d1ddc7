from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(1)  # the CI box has 2 shared cores; more threads only contend

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from fedblend.vision.backbones import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0, image_size=32)


def vision_cfg(**vision):
    from fedblend.config import config_from_dict

    v = {"backbone": "tiny_clip", "image_size": 32, "dataset": "synthetic",
         "class_names": ["red", "green", "blue", "yellow"], "synthetic_per_class": 12,
         "own_test_size": 8}
    v.update(vision)
    return config_from_dict({"algorithm": "fedclip", "vision": v,
                             "data": {"num_clients": 2}, "engine": {"progress": False}})
