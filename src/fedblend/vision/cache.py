"""Frozen-feature cache on disk, keyed by backbone + preprocessing + data fingerprint.

The backbone fingerprint already hashes the weights, the quantization and the preprocessing
(size, mean, std, resize); the data fingerprint hashes every example's image bytes and
corruption, in order. Any change gives a new key, so a stale file is never read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedblend.vision.images import ImageExample, pixels


def data_fingerprint(examples: Sequence[ImageExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.key.encode())
    return h.hexdigest()


def cache_key(backbone_fp: str, examples: Sequence[ImageExample]) -> str:
    return hashlib.sha256(f"{backbone_fp}:{data_fingerprint(examples)}".encode()).hexdigest()[:32]


@torch.no_grad()
def compute_features(
    encode: Callable[[torch.Tensor], torch.Tensor], examples: Sequence[ImageExample], size: int,
    mean, std, batch_size: int, progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out.append(encode(pixels(chunk, size, mean, std)).float())
        if progress:
            progress(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 0)


class FeatureCache:
    """``get(examples)`` returns their frozen features, from disk when the key matches."""

    def __init__(self, root: str | Path | None, backbone, size: int, batch_size: int) -> None:
        self.root = Path(root) / "features" if root else None
        self.backbone = backbone
        self.size = size
        self.batch_size = batch_size
        self.hits = 0
        self.misses = 0

    def path_for(self, examples: Sequence[ImageExample]) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{cache_key(self.backbone.fingerprint, examples)}.safetensors"

    def get(self, examples: Sequence[ImageExample], progress: Callable[[int], None] | None = None) -> torch.Tensor:
        path = self.path_for(examples)
        if path is not None and path.is_file():
            self.hits += 1
            if progress:
                progress(len(examples))
            return load_file(str(path))["features"]
        self.misses += 1
        mean, std = self.backbone.extra["mean"], self.backbone.extra["std"]
        feats = compute_features(self.backbone.encode, examples, self.size, mean, std, self.batch_size, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes sharing the cache: each its own
            save_file({"features": feats.contiguous()}, str(tmp))
            tmp.replace(path)
        return feats
