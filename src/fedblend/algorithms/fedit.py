"""FedIT (Shepherd, Zhang et al. 2024): FedAvg of one LoRA adapter, weighted by example count."""

from __future__ import annotations

from collections.abc import Mapping

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message


def train_global(
    ctx: ClientContext, payload: Message, epochs: float, prox_mu: float = 0.0,
    mix: Mapping[str, float] | None = None,
) -> Message:
    """Load the server's global adapter, train it on the client's data, return it. ``mix``
    (default G alone at 1) lets other, frozen adapters take part in the forward pass."""
    tr = ctx.trainer
    tr.adapters.set("global", payload.tensors["global"])
    prox = (prox_mu, payload.tensors["global"]) if prox_mu > 0 else None
    stats = tr.train(
        ("client", ctx.cid), ctx.examples, ["global"], mix or {"global": 1.0}, epochs, ctx.seed,
        prox=prox, progress=ctx.progress,
    )
    return Message({"global": tr.adapters.get("global")}, len(ctx.examples), stats)


class FedIT(Algorithm):
    name = "fedit"
    paper = "Zhang et al., ICASSP 2024, arXiv 2305.05644"
    shared_roles = ("global",)

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        return train_global(ctx, payload, self.cfg.train.local_epochs), state

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": final.tensors["global"]}


class Centralized(FedIT):
    """One LoRA trained on the pooled data of all clients: the upper reference."""

    name = "centralized"
    paper = "one LoRA on the pooled data (upper reference)"
    pools_data = True
