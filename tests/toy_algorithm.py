"""The toy algorithm of docs/adding-an-algorithm.md, whole: FedAvg of one LoRA adapter where
every client counts the same (not by its example count), with its own settings section.

tests/test_registry.py registers it with one line, ``register("uniform_avg", "toy_algorithm:UniformAvg")``
(in fedblend itself that line goes into ``_REGISTRY`` in ``algorithms/__init__.py``).
"""

from __future__ import annotations

from pydantic import Field

from fedblend.aggregation.fedavg import weighted_mean
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig, Section


class UniformAvgSettings(Section):
    """``[uniform_avg]``: the method's own settings (unknown keys fail at load time)."""

    min_examples: int = Field(1, ge=1, description="clients with fewer training examples are left out of the mean")


class UniformAvg(Algorithm):
    name = "uniform_avg"
    modality = "text"
    paper = "toy: FedAvg with uniform client weights"
    section = "uniform_avg"
    Settings = UniformAvgSettings
    shared_roles = ("global",)

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)  # equal ranks; a mean, so robust rules and DP compose
        if cfg.train.clients_per_round == 1:
            raise ValueError("train.clients_per_round: uniform_avg averages at least 2 clients a round")

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        tr.adapters.set("global", payload.tensors["global"])
        stats = tr.train(("client", ctx.cid), ctx.examples, ["global"], {"global": 1.0},
                         self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress)
        return Message({"global": tr.adapters.get("global")}, len(ctx.examples), stats), state

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        kept = [u.tensors["global"] for u in updates.values() if u.num_examples >= self.settings.min_examples]
        if not kept:
            return server_state
        new = {**server_state, "global": weighted_mean([(t, 1.0) for t in kept])}
        return self.server_update(new, server_state)

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": final.tensors["global"]}
