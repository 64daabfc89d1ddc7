"""Vision-path algorithms on frozen image features: FedCLIP (FedAvg of the attention adapter),
FedAvg / FedProx / local adapter baselines, zero-shot CLIP and a federated linear probe.

``ctx.examples`` is a :class:`fedblend.vision.trainer.Shard`; the trainer is a
:class:`fedblend.vision.trainer.VisionTrainer`. With ``vision.personal`` a client also keeps
a private ``local`` adapter (FedDPA-style) and predicts with both.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.algorithms.local import Local
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig, Section
from fedblend.errors import ConfigError
from fedblend.vision.heads import STATS

FEDCLIP = "Lu et al., IEEE Data Eng. Bull. 2023, arXiv 2302.13485"


class FedCLIP(Algorithm):
    """FedAvg of the adapter (+ trainable head, + backbone LoRA), weighted by example count."""

    name = "fedclip"
    modality = "vision"
    paper = FEDCLIP
    shared_roles = ("global",)
    plain_average_keys = frozenset(STATS)  # feature standardisation: averaged, not stepped
    prox_mu = 0.0
    vision_overrides: ClassVar[dict[str, Any]] = {}  # vision settings this method fixes (see effective_config)

    @property
    def personal(self) -> bool:
        return self.cfg.vision.personal

    def init_client_state(self, trainer, cid: int) -> State:
        if self.personal:
            return {"local": trainer.adapters.fresh("local", self.cfg.seed + 1 + cid)}
        return {}

    def synthetic(self, ctx: ClientContext, payload: Message, state: State):
        return None

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("global", payload.tensors["global"])
        prox = (self.prox_mu, payload.tensors["global"]) if self.prox_mu > 0 else None
        syn = self.synthetic(ctx, payload, state)
        stats = tr.train("global", ctx.examples, self.cfg.train.local_epochs, ctx.seed,
                         prox=prox, synthetic=syn, progress=ctx.progress)
        state = dict(state)
        if self.personal:
            tr.adapters.set("local", state["local"])
            tr.train("local", ctx.examples, self.cfg.train.local_epochs, ctx.seed + 1, synthetic=syn)
            state["local"] = tr.adapters.get("local")
        return Message({"global": tr.adapters.get("global")}, len(ctx.examples), stats), state

    def update_steps(self, n_examples: int, rnd: int, trainer) -> int:
        return trainer.train_steps(n_examples, self.cfg.train.local_epochs)

    def eval_adapters(self, final: Message, state: State) -> State:
        out = {"global": final.tensors["global"]}
        if self.personal:
            out["local"] = state["local"]
        return out

    def eval_mix_weights(self) -> dict[str, float]:
        if self.personal:
            a = self.cfg.vision.personal_weight
            return {"global": 1 - a, "local": a}
        return {"global": 1.0}


class FedAvgAdapter(FedCLIP):
    name = "fedavg_adapter"
    paper = "McMahan et al., AISTATS 2017 (FedAvg) on the feature adapter"


class FedProxSettings(Section):
    """``[fedprox]``: the proximal weight."""

    mu: float = Field(0.0, ge=0, description="weight of the proximal term mu/2 ||w - w_global||^2 (> 0)")


class FedProx(FedCLIP):
    """FedAvg plus the proximal term ``mu/2 ||w - w_global||^2`` in every local step."""

    name = "fedprox"
    paper = "Li et al., MLSys 2020, arXiv 1812.06127"
    section = "fedprox"
    Settings = FedProxSettings

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.section("fedprox").mu <= 0:
            raise ValueError("fedprox.mu: fedprox needs a proximal weight > 0")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.prox_mu = self.settings.mu


class LocalAdapter(Local):
    """Each client trains its own feature adapter on its own data; nothing travels."""

    name = "local_adapter"
    modality = "vision"
    paper = "each client alone (no federation)"

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("local", state["local"])
        stats = tr.train("local", ctx.examples, self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress)
        return Message({}, len(ctx.examples), stats), {"local": tr.adapters.get("local")}

    def update_steps(self, n_examples: int, rnd: int, trainer) -> int:
        return trainer.train_steps(n_examples, self.cfg.train.local_epochs)

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"local": state["local"]}

    def eval_mix_weights(self) -> dict[str, float]:
        return {"local": 1.0}


class ZeroShot(Algorithm):
    """CLIP only: cosine similarity to the class-prompt text features; no training, no bytes."""

    name = "zeroshot"
    modality = "vision"
    paper = "Radford et al., ICML 2021 (CLIP zero-shot)"
    shared_roles = ()
    vision_overrides: ClassVar[dict[str, Any]] = {"adapter": "none", "head": "text"}

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.vision.backbone not in ("clip", "tiny_clip", "module"):
            raise ValueError("vision.backbone: zeroshot needs a CLIP backbone (vision.backbone = 'clip')")

    def init_server_state(self, trainer) -> State:
        if trainer.head != "text":
            raise ConfigError("algorithm: zeroshot needs a CLIP backbone (a text tower)")
        return {}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        return Message({}, len(ctx.examples), {}), state

    def update_steps(self, n_examples: int, rnd: int, trainer) -> int:
        return 0

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": {}}

    def eval_mix_weights(self) -> dict[str, float]:
        return {"global": 1.0}


class LinearProbe(FedCLIP):
    """FedAvg of a linear classifier on frozen features (no adapter)."""

    name = "linear_probe"
    paper = "FedAvg of a linear head on frozen features"
    vision_overrides: ClassVar[dict[str, Any]] = {"adapter": "none", "head": "linear"}
