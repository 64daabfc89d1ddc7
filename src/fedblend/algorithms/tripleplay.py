"""TriplePlay (Imteaj et al. 2024): FedCLIP's adapter on a frozen (optionally NF4 + LoRA = QLoRA)
backbone, plus long-tail help.

Long-tail help (``vision.balanced_loss``, ``vision.gan``): balanced-softmax loss from the
client's class counts, and a conditional generator of synthetic *features*. The generator is
shared and averaged by the server like the adapter; each client's discriminator stays local.
After ``vision.gan_warmup_rounds`` a client tops every class up to ``gan_target`` x its largest
class count with samples from the received (averaged) generator, so classes it lacks are
learned from what other clients taught the generator. Only ``global`` (adapter) and
``generator`` tensors travel, and the transport counts both.
"""

from __future__ import annotations

import math

import torch

from fedblend.algorithms.base import ClientContext, State
from fedblend.algorithms.fedclip import FedCLIP
from fedblend.comm.codec import Message
from fedblend.vision.heads import Discriminator, Generator, train_gan


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

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.gan = cfg.vision.gan
        self.shared_roles = ("global", "generator") if self.gan else ("global",)

    def init_server_state(self, trainer) -> State:
        state = {"global": trainer.adapters.fresh("global", self.cfg.seed)}
        if self.gan:
            state["generator"] = trainer.adapters.fresh("generator", self.cfg.seed + 17)
        return state

    def _generator(self, trainer, tensors) -> Generator:
        v = self.cfg.vision
        g = Generator(v.gan_noise_dim, trainer.n_classes, v.gan_hidden, trainer.dim)
        g.load_state_dict(tensors)
        return g

    def synthetic(self, ctx: ClientContext, payload: Message, state: State):
        if not self.gan or ctx.round < self.cfg.vision.gan_warmup_rounds:
            return None
        tr = ctx.trainer
        counts = ctx.examples.class_counts(tr.n_classes)
        need = top_up_counts(counts, self.cfg.vision.gan_target, cap=2 * len(ctx.examples))
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
        v, tr = self.cfg.vision, ctx.trainer
        gen = self._generator(tr, payload.tensors["generator"])
        with torch.random.fork_rng(devices=[]):  # a per-client seed, not the process's RNG state:
            torch.manual_seed(ctx.seed + 7)  # the same discriminator in-process and on a SuperNode
            disc = Discriminator(tr.dim, tr.n_classes, v.gan_hidden)
        if "disc" in state:
            disc.load_state_dict(state["disc"])
        real = tr.all_features(ctx.examples, payload.tensors["global"])
        stats = train_gan(gen, disc, real, ctx.examples.labels, v.gan_steps, v.gan_lr, ctx.seed + 3)
        update.tensors["generator"] = {k: t.detach().clone() for k, t in gen.state_dict().items()}
        update.metrics.update(stats)
        state = {**state, "disc": {k: t.detach().clone() for k, t in disc.state_dict().items()}}
        return update, state
