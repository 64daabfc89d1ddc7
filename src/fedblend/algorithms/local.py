"""Local: each client trains its own LoRA on its own data; nothing is shared."""

from __future__ import annotations

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message


class Local(Algorithm):
    name = "local"
    paper = "each client alone (no federation)"
    shared_roles = ()

    def init_server_state(self, trainer) -> State:
        return {}

    def init_client_state(self, trainer, cid: int) -> State:
        return {"local": trainer.adapters.fresh("local", self.cfg.seed + 1 + cid)}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("local", state["local"])
        stats = tr.train(
            ("client", ctx.cid), ctx.examples, ["local"], {"local": 1.0},
            self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress,
        )
        return Message({}, len(ctx.examples), stats), {"local": tr.adapters.get("local")}

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"local": state["local"]}

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ("local",)
