"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, ACL 2025, arXiv 2410.09432): exact aggregation,
the residual folded into the frozen weights (``../shared/docs/METHODS.md`` part 2, section 6).

Round t: every client starts from ``W_t + s B_bar A_bar``, trains A_i, B_i and sends them. The
server averages ``A_bar = sum p_i A_i``, ``B_bar = sum p_i B_i`` (example-weighted; the code's
uniform 1/k is the equal-size case) and merges the residual
``R = sum p_i B_i A_i - B_bar A_bar``: ``W_{t+1} = W_t + s R``, in the base layer's own layout
(the official code transposes it for every model, wrong for nn.Linear). Hence
``W_{t+1} + s B_bar A_bar = W_t + sum p_i s B_i A_i`` exactly. The residual travels factored,
``[B_1..B_k, B_bar] [p_1 A_1; ...; p_k A_k; -A_bar]`` ((k+1) r (d_in + d_out) numbers), or dense
(d_out d_in), whichever is smaller (``[fedex_lora] residual``; the code always sends it dense).
Every client's model: ``W0 + delta`` plus the global LoRA (``B_bar``, ``A_bar``). Equal ranks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedblend.aggregation import exact
from fedblend.algorithms.base import ClientContext, State
from fedblend.algorithms.fedit import train_global
from fedblend.algorithms.merged_base import MergesIntoBase
from fedblend.comm.codec import BASE_DELTA, Message
from fedblend.config import Section


class FedExLoRASettings(Section):
    """``[fedex_lora]``."""

    residual: Literal["auto", "factored", "dense"] = Field(
        "auto", description="how each round's residual s R travels: factored ([B_1..B_k, B_bar] "
        "times [p_1 A_1; ..; -A_bar]), dense (d_out x d_in, as the official code), or auto = "
        "whichever has fewer numbers",
    )


class FedExLoRA(MergesIntoBase):
    name = "fedex_lora"
    paper = "Singhal, Ponkshe, Vepakomma: FedEx-LoRA, ACL 2025, arXiv 2410.09432"
    section = "fedex_lora"
    Settings = FedExLoRASettings
    shared_roles = ("global",)
    downlink_setting = "residual"

    def init_server_state(self, trainer) -> State:
        return {"global": trainer.adapters.fresh("global", self.cfg.seed), **self.fresh_server_state()}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        state = self.synced(payload, state)
        self.load_base(ctx.trainer, state)
        return train_global(ctx, payload, self.cfg.train.local_epochs), state

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        cids = sorted(updates)
        mean, residual = exact.fedex([updates[c].tensors["global"] for c in cids],
                                     [float(updates[c].num_examples) for c in cids])
        new = self.merged(server_state, cids, residual, self.cfg.lora.scaling_for(self.cfg.lora.r))
        new["global"] = mean
        return new

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": final.tensors["global"], BASE_DELTA: state.get(BASE_DELTA, {})}
