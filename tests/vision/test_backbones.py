"""NF4 backbones and QLoRA on the tiny CLIP, and the memory they report."""

from __future__ import annotations

import torch

from fedblend.vision.backbones import load_backbone
from fedblend.vision.images import pixels, synthetic_images
from fedblend.vision.trainer import VisionTrainer

from .conftest import vision_cfg

NAMES = ["red", "green", "blue", "yellow"]


def _feats(bb, n=16):
    ex = synthetic_images(4, n // 4, seed=1)
    with torch.no_grad():
        return bb.encode(pixels(ex, 32, bb.extra["mean"], bb.extra["std"]))


def test_nf4_features_close_to_fp32_and_smaller(tiny_clip_dir):
    fp = load_backbone(vision_cfg(backbone="clip", path=str(tiny_clip_dir)).vision, NAMES, 0)
    q = load_backbone(vision_cfg(backbone="clip", path=str(tiny_clip_dir), nf4=True).vision, NAMES, 0)
    cos = torch.nn.functional.cosine_similarity(_feats(fp), _feats(q))
    assert cos.min() > 0.95, cos
    assert q.backbone_bytes < 0.6 * fp.backbone_bytes
    assert q.fingerprint != fp.fingerprint
    tcos = torch.nn.functional.cosine_similarity(fp.text_features, q.text_features)
    assert tcos.min() > 0.9


def test_double_quant_changes_fingerprint(tiny_clip_dir):
    a = load_backbone(vision_cfg(backbone="clip", path=str(tiny_clip_dir), nf4=True).vision, NAMES, 0)
    b = load_backbone(vision_cfg(backbone="clip", path=str(tiny_clip_dir), nf4=True,
                                 double_quant=False).vision, NAMES, 0)
    assert a.fingerprint != b.fingerprint


def test_qlora_gets_gradients_and_nf4_weights_stay(tiny_clip_dir):
    import bitsandbytes as bnb

    cfg = vision_cfg(backbone="clip", path=str(tiny_clip_dir), nf4=True, lora=True)
    bb = load_backbone(cfg.vision, NAMES, 0)
    tr = VisionTrainer(cfg, bb, 4)
    q4 = [m for m in bb.clip.vision_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q4, "no NF4 layers in the vision tower"
    before = [m.weight.data.clone() for m in q4]
    tr.adapters.fresh("global", 0)
    # lora_B starts at zero; give it a value so lora_A gets a gradient too
    tr.adapters.state["global"] = {k: (torch.full_like(v, 0.01) if "lora_B" in k else v)
                                   for k, v in tr.adapters.state["global"].items()}
    start = tr.adapters.get("global")
    shard = tr.shard(synthetic_images(4, 4, seed=2))
    assert shard.feats is None  # LoRA in the backbone: full forward passes, no feature cache
    tr.train("global", shard, 1, seed=0)
    after = tr.adapters.get("global")
    lora_keys = [k for k in after if k.startswith("lora.")]
    assert lora_keys
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.lora_params().values())
    assert any(not torch.equal(start[k], after[k]) for k in lora_keys)
    for m, w in zip(q4, before, strict=True):
        assert m.weight.dtype == torch.uint8
        assert torch.equal(m.weight.data, w)


def test_efficientnet_backbone_is_rejected_for_lora():
    import pytest

    from fedblend.errors import ConfigError

    cfg = vision_cfg(backbone="efficientnet_lite0", lora=True)
    with pytest.raises(ConfigError, match="vision.lora"):
        load_backbone(cfg.vision, NAMES, 0)
