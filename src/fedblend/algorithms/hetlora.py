"""HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi, EMNLP 2024 main, arXiv 2401.06432): heterogeneous
ranks by truncation and zero-padding, sparsity-weighted aggregation and rank self-pruning
(METHODS.md part 2, section 5; no official code exists).

Server state: the global adapter ``B_g`` (``d_out x r_max``), ``A_g`` (``r_max = lora.r``) at
the server scaling ``s = lora.scaling_for(r_max)``, and every client's current rank (role
``hetlora_ranks``, so a resumed or distributed run knows it; a client not seen yet starts at
``cfg.client_rank(cid)``).

Round: client k gets ``B_g[:, :r_k]``, ``A_g[:r_k, :]`` (both times ``sqrt(s / s_k)`` where its
scaling ``s_k`` differs: METHODS 5(e)); trains them (the server-rank adapter zero-padded, at
``s_k``) with the loss plus ``lam * sum_layers ||B[:, q:]||_F ||A[q:, :]||_F``, ``q = floor(gamma
r_k)``; if that norm product fell during training (and ``prune``), ``r_k <- max(r_min, floor(gamma
r_k))`` and the dropped components are not sent. The server zero-pads every update to
``r_max`` and takes, per layer, ``B_g = sum_k w_k pad(B_k)``, ``A_g = sum_k w_k pad(A_k)`` with
``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F`` (per layer, as METHODS recommends; data
sizes are not used); rank slots no participant covers keep their previous value. DoRA
magnitudes are averaged by example count.

Evaluation (``[hetlora] evaluate``): ``global`` (default) scores every client with the rank-
``r_max`` global adapter; ``client`` each client with its rank-``r_k`` truncation (its rank at
the end). The exported ``adapters/global`` is the rank-``r_max`` adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedblend.adapters.lora import rank_of, truncate_rank
from fedblend.aggregation import lowrank
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.algorithms.flexlora import RANK, eval_at_rank, train_at_rank
from fedblend.comm.codec import Message, Tensors
from fedblend.config import ExperimentConfig, Section

RANKS = "hetlora_ranks"  # server-state role: {str(cid): tensor([r_k])}


class HetLoRASettings(Section):
    """``[hetlora]``: rank decay, penalty, pruning, and which model a client is scored with."""

    inference_only: ClassVar[frozenset[str]] = frozenset({"evaluate"})
    gamma: float = Field(0.99, gt=0, le=1, description="rank decay: the penalty and pruning act on "
                         "the components from floor(gamma r) on")
    lam: float = Field(1e-3, ge=0, description="weight of the rank penalty ||B[:, q:]||_F ||A[q:, :]||_F")
    r_min: int = Field(1, ge=1, description="no client is pruned below this rank")
    prune: bool = Field(True, description="self-pruning: r <- max(r_min, floor(gamma r)) when the "
                        "penalised norm product fell during local training")
    evaluate: Literal["global", "client"] = Field(
        "global", description="global: every client scores the rank-lora.r global adapter; client: "
        "each client its own rank-r_k truncation",
    )


class HetLoRA(Algorithm):
    name = "hetlora"
    paper = ("Cho, Liu, Xu, Fahrezi, Joshi: Heterogeneous LoRA for Federated Fine-tuning of "
             "On-Device Foundation Models, EMNLP 2024, arXiv 2401.06432")
    section = "hetlora"
    Settings = HetLoRASettings
    shared_roles = ("global",)
    mean_aggregation = False  # weights from the updates' norms, not a mean robust rules can replace
    equal_ranks = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.last_aggregation: dict = {}

    @property
    def top_scale(self) -> float:
        return self.cfg.lora.scaling_for(self.cfg.lora.r)

    def rank(self, cid: int, server_state: State) -> int:
        """Client ``cid``'s current rank: as the server last saw it, else its configured one."""
        stored = server_state.get(RANKS, {}).get(str(cid))
        return int(stored) if stored is not None else self.cfg.client_rank(cid)

    def payload_for(self, cid: int, server_state: State, r: int | None = None) -> Tensors:
        r = self.rank(cid, server_state) if r is None else r
        t = truncate_rank(server_state["global"], r)
        return lowrank.rescale(t, self.top_scale / self.cfg.lora.scaling_for(r))

    def init_client_state(self, trainer, cid: int) -> State:
        return {RANK: {"r": torch.tensor([self.cfg.client_rank(cid)])}}

    def configure_round(self, rnd: int, server_state: State, client_ids: Sequence[int]) -> dict[int, Message]:
        return {cid: Message({"global": self.payload_for(cid, server_state)}, config={"round": rnd})
                for cid in client_ids}

    def expected_update(self, cid: int, server_state: State, update: Message) -> State:
        """The rank the server sent, or (with pruning) the one pruning allows; the update's
        declared rank (``config["rank"]``) picks between the two, its tensors must match it."""
        st = self.settings
        r = self.rank(cid, server_state)
        pruned = lowrank.prune_rank(r, st.gamma, st.r_min, 1.0, 0.0) if st.prune else r
        declared = update.config.get("rank")
        r_up = pruned if declared == pruned else r
        return {"global": self.payload_for(cid, server_state, r_up)}

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        st = self.settings
        g = payload.tensors["global"]
        r = rank_of(g)
        live = ctx.trainer.adapters.params["global"]
        penalty = (lambda: lowrank.hetlora_penalty(live, r, st.gamma, st.lam)) if st.lam > 0 else None
        before = float(lowrank.tail_norm_product(g, r, st.gamma))
        trained, stats = train_at_rank(ctx, g, r, self.cfg.lora.scaling_for(r), penalty)
        after = float(lowrank.tail_norm_product(trained, r, st.gamma))
        r_new = lowrank.prune_rank(r, st.gamma, st.r_min, before, after) if st.prune else r
        metrics = {**stats, "rank": r_new, "tail_norm_before": before, "tail_norm_after": after}
        out = Message({"global": truncate_rank(trained, r_new)}, len(ctx.examples), metrics, {"rank": r_new})
        return out, {**state, RANK: {"r": torch.tensor([r_new])}}

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        ups = sorted(updates.items())
        items = [(u.tensors["global"], self.cfg.lora.scaling_for(rank_of(u.tensors["global"]))) for _, u in ups]
        new_global, weights = lowrank.hetlora_aggregate(
            items, server_state["global"], self.top_scale, [float(u.num_examples) for _, u in ups])
        ranks = dict(server_state.get(RANKS, {}))
        for cid, u in ups:
            ranks[str(cid)] = torch.tensor([rank_of(u.tensors["global"])])
        layer_w = list(weights.values())
        self.last_aggregation = {
            "rule": self.name,
            "ranks": {str(cid): rank_of(u.tensors["global"]) for cid, u in ups},
            # each client's sparsity weight, averaged over layers
            "weights": {str(cid): sum(w[i] for w in layer_w) / len(layer_w) for i, (cid, _) in enumerate(ups)},
        }
        return self.server_update({**server_state, "global": new_global, RANKS: ranks}, server_state)

    def eval_adapters(self, final: Message, state: State) -> State:
        return eval_at_rank(final, state, self.settings.evaluate, self.cfg.lora.r)
