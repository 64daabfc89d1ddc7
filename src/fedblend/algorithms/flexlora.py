"""FlexLoRA (Bai, Chen, Qian, Yao, Li, NeurIPS 2024, arXiv 2402.11505): clients at different
LoRA ranks; the server averages the full-size updates and cuts each client's factors from
their SVD (METHODS.md part 2, section 4).

Round: client i (rank ``r_i = cfg.client_rank(i)``, scaling ``s_i = lora.scaling_for(r_i)``)
receives ``A_i = V[:, :r_i]^T``, ``B_i = U[:, :r_i] diag(sigma) / s_i`` (round 0: the seeded PEFT
init, truncated), trains them from these values and sends them back (``r_i (d_in + d_out)``
numbers per layer each way: ``bytes_up`` / ``bytes_down`` count what travels). The server
forms ``dW_g = sum_i p_i s_i B_i A_i`` (``p_i`` by example count, this round's participants) by
the exact QR + small-SVD route of :func:`fedblend.aggregation.lowrank.flexlora_svd` and keeps
its rank-``lora.r`` truncation (``lora.r`` = the largest client rank) as the ``global``
adapter at the server scaling ``s = lora.scaling_for(lora.r)``: every client's truncation is
its first ``r_i`` components (singular values sorted), so nothing else needs storing.

A client trains the server-rank PEFT adapter zero-padded beyond ``r_i`` (padded rows and
columns get zero gradients) at its own scaling, and truncates before sending.

Evaluation (``[flexlora] evaluate``): ``global`` (default) scores every client with the rank-
``lora.r`` truncation of ``W0 + dW_g`` (the best approximation a PEFT adapter of the server's
rank holds; ``metrics.jsonl``'s ``aggregation.energy_kept`` says how much of ``dW_g`` it keeps);
``client`` scores each client with its own rank-``r_i`` truncation (what it would deploy). The
exported ``adapters/global`` is the rank-``lora.r`` truncation either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedblend.adapters.lora import pad_rank, truncate_rank
from fedblend.aggregation import lowrank
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message, Tensors
from fedblend.config import ExperimentConfig, Section

RANK = "rank"  # client-state role: {"r": tensor([r_i])}


class FlexLoRASettings(Section):
    """``[flexlora]``: which truncation a client is scored with (inference only)."""

    inference_only: ClassVar[frozenset[str]] = frozenset({"evaluate"})
    evaluate: Literal["global", "client"] = Field(
        "global", description="global: every client scores the server's rank-lora.r truncation of "
        "W0 + dW_g; client: each client its own rank-r_i truncation",
    )


def train_at_rank(ctx: ClientContext, tensors: Tensors, r: int, s: float,
                  penalty: Callable[[], torch.Tensor] | None = None) -> tuple[Tensors, dict]:
    """Train a rank-``r`` adapter at scaling ``s`` on the client's data: the server-rank PEFT
    adapter zero-padded, the role's scaling set to ``s`` for the duration; returns its first
    ``r`` components (what the client sends) and the training stats."""
    tr, cfg = ctx.trainer, ctx.cfg
    padded = pad_rank(tensors, cfg.lora.r)
    tr.adapters.set("global", padded)
    default = tr.adapters.scale["global"]
    tr.adapters.set_scaling("global", s)
    try:
        stats = tr.train(("client", ctx.cid), ctx.examples, ["global"], {"global": 1.0},
                         cfg.train.local_epochs, ctx.seed, progress=ctx.progress, penalty=penalty)
    finally:
        tr.adapters.set_scaling("global", default)
    return truncate_rank(tr.adapters.get("global"), r), stats


def eval_at_rank(final: Message, state: State, mode: str, top: int) -> State:
    """The ``global`` adapter a client evaluates: the server's (``mode = "global"``) or its
    first ``r_i`` components zero-padded (``"client"``: at the server scaling that is the
    client's rank-``r_i`` model)."""
    g = final.tensors["global"]
    if mode == "client" and RANK in state:
        g = pad_rank(truncate_rank(g, int(state[RANK]["r"])), top)
    return {"global": g}


class FlexLoRA(Algorithm):
    name = "flexlora"
    paper = ("Bai, Chen, Qian, Yao, Li: Federated Fine-tuning of Large Language Models under "
             "Heterogeneous Tasks and Client Resources, NeurIPS 2024, arXiv 2402.11505")
    section = "flexlora"
    Settings = FlexLoRASettings
    shared_roles = ("global",)
    mean_aggregation = False  # an SVD of the weighted sum of products, not a mean of tensors
    equal_ranks = False

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.train.server_lr != 1.0 or cfg.train.server_momentum != 0.0:
            key = "train.server_lr" if cfg.train.server_lr != 1.0 else "train.server_momentum"
            raise ValueError(f"{key}: {cls.name}'s global factors are cut from an SVD each round; "
                             "a server optimizer step on them has no meaning")

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.last_aggregation: dict = {}

    @property
    def top_scale(self) -> float:
        return self.cfg.lora.scaling_for(self.cfg.lora.r)

    def init_client_state(self, trainer, cid: int) -> State:
        return {RANK: {"r": torch.tensor([self.cfg.client_rank(cid)])}}

    def payload_for(self, cid: int, server_state: State) -> Tensors:
        """Client ``cid``'s factors: the first ``r_i`` components, B rescaled to ``s_i``."""
        r = self.cfg.client_rank(cid)
        return lowrank.client_factors(server_state["global"], r, self.top_scale / self.cfg.lora.scaling_for(r))

    def configure_round(self, rnd: int, server_state: State, client_ids: Sequence[int]) -> dict[int, Message]:
        return {cid: Message({"global": self.payload_for(cid, server_state)}, config={"round": rnd})
                for cid in client_ids}

    def expected_update(self, cid: int, server_state: State, update: Message) -> State:
        return {"global": self.payload_for(cid, server_state)}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        r = self.cfg.client_rank(ctx.cid)
        tensors, stats = train_at_rank(ctx, payload.tensors["global"], r, self.cfg.lora.scaling_for(r))
        return Message({"global": tensors}, len(ctx.examples), stats), {**state, RANK: {"r": torch.tensor([r])}}

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        total = float(sum(u.num_examples for u in updates.values()))
        items = [(u.tensors["global"], u.num_examples / total, self.cfg.lora.scaling_for(self.cfg.client_rank(cid)))
                 for cid, u in sorted(updates.items())]
        new_global, info = lowrank.flexlora_aggregate(items, self.cfg.lora.r, self.top_scale)
        self.last_aggregation = {"rule": self.name, **info}
        return {**server_state, "global": new_global}

    def eval_adapters(self, final: Message, state: State) -> State:
        return eval_at_rank(final, state, self.settings.evaluate, self.cfg.lora.r)
