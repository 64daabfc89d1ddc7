"""The vision trainer: one frozen backbone, per-role feature models (adapter + head), optional
LoRA in the backbone, training on cached features or on full forward passes.

Roles are ``global`` / ``local`` (adapter + trainable head, plus ``lora.*`` tensors when LoRA
sits in the backbone) and ``generator`` (the conditional feature GAN's generator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedblend.config import ExperimentConfig
from fedblend.errors import ConfigError
from fedblend.vision.backbones import VisionBackbone
from fedblend.vision.cache import FeatureCache
from fedblend.vision.heads import FeatureModel, balanced_softmax_loss, contrastive_loss
from fedblend.vision.images import ImageExample, pixels

Tensors = dict[str, torch.Tensor]
LORA = "lora."
HEAD_PARAMS = ("prototypes", "linear.")  # frozen at their shared seeded init when not train_head


@dataclass
class Shard:
    """One client's (or test set's) images, as frozen features or as preprocessed pixels."""

    examples: Sequence[ImageExample]
    labels: torch.Tensor
    feats: torch.Tensor | None = None
    pix: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def class_counts(self, n_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=n_classes)


class RoleStore:
    """``trainer.adapters``: fresh / get / set tensors by role (the algorithm seam's contract)."""

    def __init__(self, trainer: VisionTrainer) -> None:
        self.t = trainer
        self.state: dict[str, Tensors] = {}

    @property
    def roles(self) -> list[str]:
        return sorted(self.state)

    def fresh(self, role: str, seed: int) -> Tensors:
        torch.manual_seed(seed)
        out = {k: p.detach().clone() for k, p in self.t.new_model().trainable().items()}
        g = torch.Generator().manual_seed(seed)
        for name, p in self.t.lora_params().items():
            if "lora_A" in name:
                out[LORA + name] = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            else:
                out[LORA + name] = torch.zeros(p.shape)
        self.state[role] = out
        return {k: v.clone() for k, v in out.items()}

    def get(self, role: str) -> Tensors:
        return {k: v.detach().clone() for k, v in self.state[role].items()}

    def set(self, role: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.state[role] = {k: v.detach().clone().float() for k, v in tensors.items()}

    def num_parameters(self, role: str) -> int:
        return sum(t.numel() for t in self.state.get(role, {}).values())

    def export(self, role: str, tensors: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter.safetensors"))
        return out_dir


class VisionTrainer:
    def __init__(self, cfg: ExperimentConfig, backbone: VisionBackbone, n_classes: int) -> None:
        self.cfg, self.v, self.backbone, self.n_classes = cfg, cfg.vision, backbone, n_classes
        v = self.v
        self.head = v.head if v.head != "auto" else ("text" if backbone.text_features is not None else "cosine")
        if self.head == "text" and backbone.text_features is None:
            raise ConfigError("vision.head: 'text' needs a backbone with a text tower (CLIP)")
        if self.head == "text" and v.feature_norm == "standardize":
            raise ConfigError("vision.feature_norm: 'standardize' moves image features out of CLIP's "
                              "joint space; use 'l2' with the text head (or head = 'cosine')")
        self.scale = v.logit_scale or backbone.logit_scale
        self.dim = backbone.dim
        self.use_cache = bool(v.cache_dir) and not v.lora
        self.cache = FeatureCache(v.cache_dir or None, backbone, v.image_size, v.feature_batch_size)
        self._lora_params: dict[str, torch.nn.Parameter] = {}
        if v.lora:
            self._inject_lora()
        if not v.train_head and v.adapter == "none" and not v.lora:
            raise ConfigError("vision.train_head: false with adapter = 'none' leaves nothing to train")
        self.adapters = RoleStore(self)

    # ---- LoRA in the backbone's attention projections (QLoRA when the backbone is NF4) ---------
    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        assert self.backbone.clip is not None
        lc = self.cfg.lora
        vm = self.backbone.clip.vision_model
        inject_adapter_in_model(LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=0.0,
                                           target_modules=lc.target_modules), vm)
        self._lora_params = {n: p for n, p in vm.named_parameters() if "lora_" in n}
        if not self._lora_params:
            raise ConfigError(f"lora.target_modules: none of {lc.target_modules} is in the vision tower")
        for p in self._lora_params.values():
            p.requires_grad_(True)

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        return self._lora_params

    def _load_lora(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self._lora_params.items():
                p.copy_(tensors[LORA + name])

    # ---- models -------------------------------------------------------------------------------
    def new_model(self) -> FeatureModel:
        return FeatureModel(self.dim, self.n_classes, self.v.adapter, self.head, self.scale,
                            self.backbone.text_features, self.v.adapter_reduction, self.v.adapter_ratio,
                            standardize=self.v.feature_norm == "standardize")

    def model_for(self, tensors: Mapping[str, torch.Tensor]) -> FeatureModel:
        m = self.new_model()
        own = {k: v for k, v in tensors.items() if not k.startswith(LORA)}
        m.load_state_dict(own, strict=False)
        return m

    # ---- data ---------------------------------------------------------------------------------
    def shard(self, examples: Sequence[ImageExample], progress: Callable[[int], None] | None = None) -> Shard:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        if self.use_cache:
            return Shard(examples, labels, feats=self.cache.get(examples, progress))
        bb = self.backbone.extra
        pix = pixels(examples, self.v.image_size, bb["mean"], bb["std"])
        if progress:
            progress(len(examples))
        return Shard(examples, labels, pix=pix)

    def features(self, shard: Shard, idx: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if shard.feats is not None:
            return shard.feats[idx]
        with torch.set_grad_enabled(grad):
            return self.backbone.encode(shard.pix[idx])  # type: ignore[index]

    @torch.no_grad()
    def all_features(self, shard: Shard, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if shard.feats is not None:
            return shard.feats
        if tensors is not None and self._lora_params:
            self._load_lora(tensors)
        bs = self.v.feature_batch_size
        return torch.cat([self.features(shard, torch.arange(i, min(i + bs, len(shard))))
                          for i in range(0, len(shard), bs)])

    def train_steps(self, n_examples: int, epochs: float) -> int:
        return max(1, math.ceil(n_examples / self.cfg.train.batch_size)) * max(1, math.ceil(epochs))

    # ---- training -------------------------------------------------------------------------------
    def train(
        self, role: str, shard: Shard, epochs: float, seed: int,
        prox: tuple[float, Mapping[str, torch.Tensor]] | None = None,
        synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Train ``role`` (adapter + head [+ LoRA]) on ``shard`` plus optional synthetic features."""
        tc = self.cfg.train
        tensors = self.adapters.state[role]
        model = self.model_for(tensors)
        if model.standardize and not model.has_stats:
            # first time this role trains here: measure the statistics on the real features;
            # FedAvg (example-weighted) then turns the clients' into the pooled statistics
            model.set_stats(self.all_features(shard, tensors))
        params = [p for n, p in model.trainable().items()
                  if p.requires_grad and (self.v.train_head or not n.startswith(HEAD_PARAMS))]
        if self._lora_params:
            self._load_lora(tensors)
            params += list(self._lora_params.values())
        opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
        n_real = len(shard)
        syn_f, syn_y = synthetic if synthetic is not None else (torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long))
        labels = torch.cat([shard.labels, syn_y])
        counts = torch.bincount(labels, minlength=self.n_classes)
        ref = None
        if prox is not None:
            ref = {k: v.detach() for k, v in prox[1].items()}
        g = torch.Generator().manual_seed(seed)
        losses = []
        n_total = len(labels)
        for _ in range(max(1, math.ceil(epochs))):
            perm = torch.randperm(n_total, generator=g)
            for i in range(0, n_total, tc.batch_size):
                idx = perm[i : i + tc.batch_size]
                real, fake = idx[idx < n_real], idx[idx >= n_real] - n_real
                parts = []
                if len(real):
                    parts.append(self.features(shard, real, grad=bool(self._lora_params)))
                if len(fake):
                    parts.append(syn_f[fake])
                f = torch.cat(parts)
                y = torch.cat([shard.labels[real], syn_y[fake]])
                loss = self._loss(model, f, y, counts)
                if ref is not None:
                    cur = {**model.trainable(), **{LORA + k: p for k, p in self._lora_params.items()}}
                    loss = loss + prox[0] / 2 * sum(((cur[k] - ref[k].to(cur[k].device)) ** 2).sum()
                                                   for k in cur if k in ref)
                opt.zero_grad()
                loss.backward()
                if tc.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                opt.step()
                losses.append(loss.item())
                if progress:
                    progress(1)
        out = {k: p.detach().clone() for k, p in model.trainable().items()}
        out.update({LORA + k: p.detach().to("cpu", copy=True) for k, p in self._lora_params.items()})
        self.adapters.set(role, out)
        return {"loss": sum(losses) / max(1, len(losses)), "synthetic": float(len(syn_y))}

    def _loss(self, model: FeatureModel, f: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.v.balanced_loss:
            return balanced_softmax_loss(model(f), y, counts)
        contrastive = self.v.loss == "contrastive" or (self.v.loss == "auto" and self.head == "text")
        if contrastive and self.head != "linear":
            # a client whose batch holds one class gets no signal from this loss: with
            # learned prototypes (no text tower) "auto" uses cross-entropy over all classes
            return contrastive_loss(model.embed(f), model.class_weights(), y, self.scale)
        return F.cross_entropy(model(f), y)

    # ---- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, mix: Mapping[str, float], adapters: Mapping[str, Mapping[str, torch.Tensor]], shard: Shard) -> torch.Tensor:
        """Top-1 classes from the weighted sum of each role's probabilities."""
        probs = torch.zeros(len(shard), self.n_classes)
        for role, w in mix.items():
            tensors = adapters[role]
            feats = self.all_features(shard, tensors)
            probs += w * torch.softmax(self.model_for(tensors)(feats), dim=-1)
        return probs.argmax(dim=-1)
