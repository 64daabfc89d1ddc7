"""TriplePlay (Imteaj et al. 2024): FedCLIP's adapter on a frozen (optionally NF4 + LoRA = QLoRA)
backbone, plus long-tail help.

Long-tail help (``vision.balanced_loss``, ``tripleplay.gan``): balanced-softmax loss from the
client's class counts, and a conditional generator of synthetic *features*. The generator is
shared and averaged by the server like the adapter; each client's discriminator stays local.
After ``tripleplay.warmup_rounds`` a client tops every class up to ``tripleplay.target`` x its largest
class count with samples from the received (averaged) generator, so classes it lacks are
learned from what other clients taught the generator. Only ``global`` (adapter) and
``generator`` tensors travel, and the transport counts both.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedblend.algorithms.base import ClientContext, State
from fedblend.algorithms.fedclip import FedCLIP
from fedblend.comm.codec import Message
from fedblend.config import Section
from fedblend.vision.heads import Discriminator, Generator, train_gan


class TriplePlaySettings(Section):
    """``[tripleplay]``: the federated feature generator for rare and missing classes."""

    gan: bool = Field(False, description="conditional feature GAN for rare/missing classes")
    noise_dim: int = Field(32, ge=1)
    hidden: int = Field(256, ge=8)
    steps: int = Field(50, ge=1, description="GAN steps per client per round")
    lr: float = Field(2e-3, gt=0)
    warmup_rounds: int = Field(1, ge=0, description="rounds before synthetic features are used")
    target: float = Field(0.5, gt=0, le=1, description="top up each class to this x max count")


def top_up_counts(counts: torch.Tensor, target: float, cap: int) -> torch.Tensor:
    """Synthetic examples per class: up to ``target * max(counts)``, at most ``cap`` in all."""
    goal = math.ceil(target * int(counts.max()))
    need = (goal - counts).clamp(min=0)
    total = int(need.sum())
    if total > cap > 0:
        need = (need.float() * cap / total).floor().long()
    return need


class TriplePlay(FedCLIP):
    name = "tripleplay"
    paper = "Imteaj et al., 2024, arXiv 2409.05347"
    section = "tripleplay"
    Settings = TriplePlaySettings

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.gan = self.settings.gan
        self.shared_roles = ("global", "generator") if self.gan else ("global",)

    def init_server_state(self, trainer) -> State:
        state = {"global": trainer.adapters.fresh("global", self.cfg.seed)}
        if self.gan:
            torch.manual_seed(self.cfg.seed + 17)
            gen = self._generator(trainer, None)
            state["generator"] = {k: p.detach().clone() for k, p in gen.state_dict().items()}
            trainer.adapters.set("generator", state["generator"])  # counted in adapter_params
        return state

    def _generator(self, trainer, tensors) -> Generator:
        s = self.settings
        g = Generator(s.noise_dim, trainer.n_classes, s.hidden, trainer.dim)
        if tensors is not None:
            g.load_state_dict(tensors)
        return g

    def synthetic(self, ctx: ClientContext, payload: Message, state: State):
        if not self.gan or ctx.round < self.settings.warmup_rounds:
            return None
        tr = ctx.trainer
        counts = ctx.examples.class_counts(tr.n_classes)
        need = top_up_counts(counts, self.settings.target, cap=2 * len(ctx.examples))
        if int(need.sum()) == 0:
            return None
        y = torch.repeat_interleave(torch.arange(tr.n_classes), need)
        gen = self._generator(tr, payload.tensors["generator"])
        return gen.sample(y, ctx.seed + 5), y

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        # synthetic features come from the generator as received (the federation's average)
        update, state = super().local_update(ctx, payload, state)
        if not self.gan:
            return update, state
        v, tr = self.settings, ctx.trainer
        gen = self._generator(tr, payload.tensors["generator"])
        with torch.random.fork_rng(devices=[]):  # a per-client seed, not the process's RNG state:
            torch.manual_seed(ctx.seed + 7)  # the same discriminator in-process and on a SuperNode
            disc = Discriminator(tr.dim, tr.n_classes, v.hidden)
        if "disc" in state:
            disc.load_state_dict(state["disc"])
        real = tr.all_features(ctx.examples, payload.tensors["global"])
        stats = train_gan(gen, disc, real, ctx.examples.labels, v.steps, v.lr, ctx.seed + 3)
        update.tensors["generator"] = {k: t.detach().clone() for k, t in gen.state_dict().items()}
        update.metrics.update(stats)
        state = {**state, "disc": {k: t.detach().clone() for k, t in disc.state_dict().items()}}
        return update, state
