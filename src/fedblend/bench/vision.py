"""Images per second of frozen vision feature extraction (decode, preprocess, backbone), the
way a vision run computes its features (``vision.cache.compute_features``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.vision.backbones import load_backbone
from fedblend.vision.cache import compute_features
from fedblend.vision.images import CIFAR10_CLASSES, synthetic_images
from fedblend.vision.parquet import read_image_table

# configs/cifar10/tripleplay.toml's backbone and image size
CIFAR_VISION = {"backbone": "efficientnet_lite0", "image_size": 64, "feature_batch_size": 64,
                "cache_dir": ""}
TINY_VISION = {"backbone": "tiny_clip", "image_size": 32, "dataset": "synthetic",
               "feature_batch_size": 16}


def check_images(images_dir: Path) -> None:
    if not (images_dir / "test.parquet").is_file():
        raise ConfigError(f"--images: no CIFAR-10 test.parquet in {images_dir}")


def images_per_s(images_dir: Path | None, n: int, workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Features of ``n`` CIFAR-10 test images (``images_dir``) with EfficientNet-Lite0 at 64 px,
    or of synthetic images with the tiny CLIP when ``images_dir`` is None; one warm-up batch
    first, not timed."""
    if images_dir is None:
        vision = dict(TINY_VISION, cache_dir=str(workdir / "vision_cache"))
        names = ["a", "b", "c", "d"]
        examples = synthetic_images(len(names), max(1, n // len(names)), seed)
    else:
        vision = dict(CIFAR_VISION, dir=str(images_dir))
        names = CIFAR10_CLASSES
        examples = read_image_table(images_dir / "test.parquet").examples[:n]
    cfg = config_from_dict({"algorithm": "tripleplay", "seed": seed, "vision": vision})
    v = cfg.vision
    bb = load_backbone(v, names, seed)
    mean, std = bb.extra["mean"], bb.extra["std"]
    compute_features(bb.encode, examples[: v.feature_batch_size], v.image_size, mean, std,
                     v.feature_batch_size)
    t = time.perf_counter()
    compute_features(bb.encode, examples, v.image_size, mean, std, v.feature_batch_size)
    seconds = time.perf_counter() - t
    return {"images_per_s": len(examples) / seconds, "images": len(examples), "seconds": seconds,
            "backbone": v.backbone, "image_size": v.image_size, "batch_size": v.feature_batch_size}
