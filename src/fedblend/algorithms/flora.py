"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking-based aggregation, merged into
the base weights every round (``../shared/docs/METHODS.md`` part 2, section 3).

Round t: client k trains a fresh LoRA at its own rank r_k and scaling s_k
(``lora.client_ranks``; the server-rank adapter zero-padded, exactly equivalent) on
``W0 + delta``, and sends it truncated to r_k. The server stacks
``A_g = [p_1 (s_1/s_g) A_1; ...]``, ``B_g = [B_1, ..., B_K]`` (R = the sum of the received
ranks, s_g = ``lora.scaling_for(R)``), so ``s_g B_g A_g = sum_k p_k s_k B_k A_k`` exactly for
mixed ranks and scalings (the official code is exact only when every s_k = s_g), and merges it:
``W_{t+1} = W_t + s_g B_g A_g``. No LoRA survives a round; every client's model is ``W0`` plus
the merged increments, sent as the stack or densely, whichever has fewer numbers
(``[flora] broadcast``); see :mod:`.merged_base` for catch-up after missed rounds.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedblend.adapters.lora import pad_rank, rank_of, truncate_rank
from fedblend.aggregation import exact
from fedblend.algorithms.base import ClientContext, State
from fedblend.algorithms.merged_base import MergesIntoBase
from fedblend.comm.codec import BASE_DELTA, Message
from fedblend.config import ExperimentConfig, Section

TEMPLATE = "template"  # server state: the upload's names and shapes (zeros, at lora.r)


class FLoRASettings(Section):
    """``[flora]``."""

    broadcast: Literal["auto", "factored", "dense"] = Field(
        "auto", description="each round's merged increment as it travels: the stacked (A_g, B_g) "
        "(factored), the dense d_out x d_in product, or auto = whichever has fewer numbers",
    )


class FLoRA(MergesIntoBase):
    name = "flora"
    paper = "Wang, Shen, He, Sun, Wang, Lyu, Li: FLoRA, NeurIPS 2024, arXiv 2409.05976"
    section = "flora"
    Settings = FLoRASettings
    shared_roles = ("global",)  # the round's fresh adapter, at the client's rank
    equal_ranks = False
    downlink_setting = "broadcast"

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.comm.compress != "none":
            raise ValueError("comm.compress: flora's uploads are fresh adapters with no reference "
                             "on the server to take a delta against; use 'none'")

    def init_server_state(self, trainer) -> State:
        # zeros shaped like the server-rank adapter: what each upload is screened against (never sent)
        template = {k: torch.zeros_like(t) for k, t in trainer.adapters.get("global").items()}
        return {TEMPLATE: template, **self.fresh_server_state()}

    def expected_update(self, cid: int, server_state: State, update: Message) -> State:
        """Client ``cid``'s upload: its fresh adapter at its own rank (names, shapes, dtypes)."""
        if TEMPLATE not in server_state:
            return server_state
        return {"global": truncate_rank(server_state[TEMPLATE], self.cfg.client_rank(cid))}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        state = self.synced(payload, state)
        tr, lc = ctx.trainer, self.cfg.lora
        self.load_base(tr, state)
        r = self.cfg.client_rank(ctx.cid)
        fresh = tr.adapters.fresh("global", ctx.seed)  # PEFT's init: A Kaiming-uniform, B = 0
        tr.adapters.set("global", pad_rank(truncate_rank(fresh, r), lc.r))
        before = tr.adapters.scale["global"]
        tr.adapters.set_scaling("global", lc.scaling_for(r))
        try:
            stats = tr.train(("client", ctx.cid), ctx.examples, ["global"], {"global": 1.0},
                             self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress)
        finally:
            tr.adapters.set_scaling("global", before)
        sent = truncate_rank(tr.adapters.get("global"), r)
        return Message({"global": sent}, len(ctx.examples), stats), state

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        cids = sorted(updates)
        adapters = [updates[c].tensors["global"] for c in cids]
        ranks = [rank_of(a) for a in adapters]
        lc = self.cfg.lora
        s_g = lc.scaling_for(sum(ranks))
        stack = exact.flora_stack(adapters, [float(updates[c].num_examples) for c in cids],
                                  [lc.scaling_for(r) for r in ranks], s_g)
        return self.merged(server_state, cids, stack, s_g)

    def eval_adapters(self, final: Message, state: State) -> State:
        return {BASE_DELTA: state.get(BASE_DELTA, {})}

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ()  # no LoRA at inference: W0 + the merged increments
