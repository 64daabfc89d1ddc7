"""The frozen-feature cache is keyed by backbone + preprocessing + data."""

from __future__ import annotations

import torch

from fedblend.vision.backbones import load_backbone
from fedblend.vision.cache import FeatureCache
from fedblend.vision.images import synthetic_images

from .conftest import vision_cfg

NAMES = ["red", "green", "blue", "yellow"]


def _cache(tmp_path, clip_dir, **vision):
    v = vision_cfg(backbone="clip", path=str(clip_dir), cache_dir=str(tmp_path), **vision).vision
    bb = load_backbone(v, NAMES, 0)
    return FeatureCache(tmp_path, bb, v.image_size, 8)


def test_same_setup_hits_the_cache(tmp_path, tiny_clip_dir):
    ex = synthetic_images(4, 3, seed=0)
    a = _cache(tmp_path, tiny_clip_dir)
    f1 = a.get(ex)
    b = _cache(tmp_path, tiny_clip_dir)
    f2 = b.get(ex)
    assert (a.misses, b.hits, b.misses) == (1, 1, 0)
    assert torch.equal(f1, f2)


def test_preprocessing_change_invalidates(tmp_path, tiny_clip_dir):
    ex = synthetic_images(4, 3, seed=0)
    a = _cache(tmp_path, tiny_clip_dir)
    a.get(ex)
    b = _cache(tmp_path, tiny_clip_dir, mean=[0.4, 0.4, 0.4])
    fb = b.get(ex)
    assert b.misses == 1 and b.hits == 0
    assert b.path_for(ex) != a.path_for(ex)
    assert not torch.allclose(fb, a.get(ex))


def test_backbone_change_invalidates(tmp_path, tiny_clip_dir):
    import shutil

    from transformers import CLIPModel

    ex = synthetic_images(4, 3, seed=0)
    a = _cache(tmp_path, tiny_clip_dir)
    a.get(ex)
    # the same checkpoint with one weight changed is another backbone
    other = tmp_path / "clip2"
    shutil.copytree(tiny_clip_dir, other)
    m = CLIPModel.from_pretrained(str(other))
    with torch.no_grad():
        m.vision_model.post_layernorm.weight.add_(0.5)
    m.save_pretrained(str(other))
    b = _cache(tmp_path, other)
    b.get(ex)
    assert b.misses == 1 and b.hits == 0
    # and NF4 loading of the same weights is another backbone too
    c = _cache(tmp_path, tiny_clip_dir, nf4=True)
    c.get(ex)
    assert c.misses == 1


def test_data_change_invalidates(tmp_path, tiny_clip_dir):
    ex = synthetic_images(4, 3, seed=0)
    a = _cache(tmp_path, tiny_clip_dir)
    a.get(ex)
    a.get([e.with_domain("blur") for e in ex])
    a.get(ex[:-1])
    assert (a.hits, a.misses) == (0, 3)
