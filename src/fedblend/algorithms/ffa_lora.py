"""FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated
Learning"): A is frozen at a random initialisation shared by all clients; only B is trained
and averaged (half of LoRA's upload).

A never travels: every client derives it from the experiment's shared seed (the same
seeded PEFT init the server would draw, ``cfg.seed``), so it costs no bytes, not even in
round 0, and a Flower SuperNode derives the same A as an in-process client. B is the only
shared role (``lora_B``, zero at init as in PEFT); the A each client holds is part of its
private state (identical on every client by construction, and checkpointed with it). At
inference every client uses ``(A, averaged B)``: one global adapter, as in FedIT.
"""

from __future__ import annotations

from fedblend.adapters.lora import join_kinds, split_kinds
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message


class FFALoRA(Algorithm):
    name = "ffa_lora"
    paper = "Sun et al., ICLR 2024, arXiv 2403.12313"
    shared_roles = ("lora_B",)

    def _init(self, trainer) -> dict:
        return split_kinds(trainer.adapters.fresh("global", self.cfg.seed))

    def init_server_state(self, trainer) -> State:
        return {"lora_B": self._init(trainer)["lora_B"]}

    def init_client_state(self, trainer, cid: int) -> State:
        return {"lora_A": self._init(trainer)["lora_A"]}  # from the shared seed: never sent

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("global", join_kinds(state["lora_A"], payload.tensors["lora_B"]))
        stats = tr.train(
            ("client", ctx.cid), ctx.examples, ["global"], {"global": 1.0},
            self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress, frozen=("lora_A",),
        )
        b = split_kinds(tr.adapters.get("global"))["lora_B"]
        return Message({"lora_B": b}, len(ctx.examples), stats), state

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": join_kinds(state["lora_A"], final.tensors["lora_B"])}
