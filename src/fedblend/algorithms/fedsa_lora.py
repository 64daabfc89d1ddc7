"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning"): the A matrices of every LoRA layer are shared and averaged by the
server (general knowledge); the B matrices stay on the client (client-specific).

One LoRA adapter per client, split by factor into two roles: ``lora_A`` travels (the only
shared role, so the engine refuses any upload of B) and ``lora_B`` is the client's private
state. A starts from one seeded random init on the server; every client's B starts at zero
(PEFT's init), so round 0 begins from the same adapter everywhere. At inference each client
uses its own adapter ``(averaged A, own B)``, held in the ``local`` slot.
"""

from __future__ import annotations

from fedblend.adapters.lora import join_kinds, split_kinds
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message


class FedSALoRA(Algorithm):
    name = "fedsa_lora"
    paper = "Guo et al., ICLR 2025, arXiv 2410.01463"
    shared_roles = ("lora_A",)

    def init_server_state(self, trainer) -> State:
        return {"lora_A": split_kinds(trainer.adapters.fresh("local", self.cfg.seed))["lora_A"]}

    def init_client_state(self, trainer, cid: int) -> State:
        return {"lora_B": split_kinds(trainer.adapters.fresh("local", self.cfg.seed + 1 + cid))["lora_B"]}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("local", join_kinds(payload.tensors["lora_A"], state["lora_B"]))
        stats = tr.train(
            ("client", ctx.cid), ctx.examples, ["local"], {"local": 1.0},
            self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress,
        )
        parts = split_kinds(tr.adapters.get("local"))
        return Message({"lora_A": parts["lora_A"]}, len(ctx.examples), stats), {"lora_B": parts["lora_B"]}

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"local": join_kinds(final.tensors["lora_A"], state["lora_B"])}

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ("local",)
