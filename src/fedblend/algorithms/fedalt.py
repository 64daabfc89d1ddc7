"""FedALT: individual LoRA + Rest-of-World LoRA + adaptive mixer (Bian, Wang, Zhang, Xu,
AAAI 2026, arXiv 2503.11880): see ``METHODS.md`` section 7.

Each client i keeps, never reset and never aggregated except as below:

- its individual LoRA ``(A1_i, B1_i)`` (the DualLoRA role ``local``), trained every round;
- a router ``G_i`` per adapted layer (``nn.Linear(d_in, 2, bias=False)``, Kaiming init; the
  private role ``router``, :mod:`fedblend.adapters.router`), trained with it.

The frozen Rest-of-World LoRA ``(A0_i, B0_i)`` (the DualLoRA role ``global``) is the mean of the
OTHER clients' individual LoRAs, factor by factor: ``X0_i = (sum_j w_j X1_j - w_i X1_i) /
(sum_j w_j - w_i)`` (O(N) for all clients), with ``w_j = 1`` (``row_weights = "uniform"``, as
the official code) or ``n_j`` (``"examples"``). Each token x of every adapted layer computes
``g = softmax(G_i x)``, ``h = W0 x + s [g_0 B0_i A0_i x + g_1 B1_i A1_i x]``.

Round t:

- server -> client i: its own RoW (1x FedIT down). Round 0 (no upload yet): A Kaiming, B = 0,
  so the RoW contributes nothing;
- client i: trains ``(A1_i, B1_i)`` and ``G_i`` from its own values, RoW frozen;
- client i -> server: ``(A1_i, B1_i)`` only (role ``individual``, 1x FedIT up); the router
  never leaves (the engine's role check refuses it);
- server: keeps every client's LATEST upload (a client that sits out a round stays in the
  others' RoW with its last LoRA; it keeps its LoRA and router, and gets a fresh RoW when
  sampled again). With every client taking part each round this is the paper's RoW.

After the last round the server sends every client the weighted sum of the latest uploads and
the weights (1x FedIT down, the same message for all); each client removes its own LoRA from
it to get the RoW of the final uploads (as the official code evaluates after aggregation) and
evaluates own LoRA + that RoW + own router on its own and the other clients' tasks (P, TTP).
Cross-client batched evaluation cannot row-select routers: evaluation runs client after client.

N = 1 is refused (no rest of the world); N = 2 gives each client the other's LoRA.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from fedblend.adapters.router import ROUTER, router_for
from fedblend.algorithms.base import Algorithm, ClientContext, State, Tensors
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig, Section

INDIVIDUAL = "individual"  # message role of an upload, and the server's weighted sum of them
INIT = "init"  # the round-0 RoW (A Kaiming, B = 0)
WEIGHTS = "row_weight"  # cid -> w_j of the client's cached upload
PREFIX = "individual."  # server state: each client's latest upload


class FedALTSettings(Section):
    """``[fedalt]``."""

    row_weights: Literal["uniform", "examples"] = Field(
        "uniform", description="weights of the other clients' LoRAs in a client's rest-of-world mean: "
        "uniform (the official code) or their training examples",
    )


def rest_of_world(total: Tensors, w_total: float, own: Tensors | None, w_own: float) -> Tensors | None:
    """``(total - w_own own) / (w_total - w_own)``: the weighted mean of the other clients'
    LoRAs from the weighted sum of all (``own`` None: the client is not in the sum). None when
    no other client is in it."""
    if own is None:
        w_own = 0.0
    rest = w_total - w_own
    if rest <= 0:
        return None
    out = {}
    for k, t in total.items():
        acc = t.to(torch.float64) - (w_own * own[k].to(torch.float64) if own is not None else 0.0)
        out[k] = (acc / rest).to(t.dtype)
    return out


def weighted_sum(items: list[tuple[Tensors, float]], like: Tensors) -> Tensors:
    out = {}
    for k, t in like.items():
        acc = torch.zeros(t.shape, dtype=torch.float64)
        for tensors, w in items:
            acc += w * tensors[k].to(torch.float64)
        out[k] = acc.to(t.dtype)
    return out


class FedALT(Algorithm):
    name = "fedalt"
    modality = "text"
    paper = "Bian, Wang, Zhang, Xu, AAAI 2026, arXiv 2503.11880"
    section = "fedalt"
    Settings = FedALTSettings
    shared_roles = (INDIVIDUAL,)
    mean_aggregation = False  # a RoW per client (a mean that excludes the client), not one mean

    @classmethod
    def label(cls, cfg: ExperimentConfig) -> str:
        w = cfg.section(cls.section).row_weights
        return cls.name if w == "uniform" else f"{cls.name} ({w})"

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        n = len(cfg.data.clients) or cfg.data.num_clients
        if n < 2:
            key = "data.clients" if cfg.data.clients else "data.num_clients"
            raise ValueError(f"{key}: fedalt needs at least 2 clients (a lone client has no rest of the world)")
        if cfg.lora.dora:  # the router scales each token's roles: PEFT's DoRA norm takes one scaling
            raise ValueError("lora.dora: fedalt's router weights the adapters per token, and PEFT's DoRA "
                             "normalises each layer with one scaling; fedalt runs with plain LoRA")
        for key, on, why in (
            ("aggregate.max_update_norm", cfg.aggregate.max_update_norm > 0,
             "its uploads are whole LoRAs, not deltas of a server model"),
            ("attack.kind", cfg.attack.kind != "none", "the simulated attacks act on deltas of a received model"),
            ("train.server_lr", cfg.train.server_lr != 1.0 or cfg.train.server_momentum != 0.0,
             "there is no global model for a server step"),
        ):
            if on:
                raise ValueError(f"{key}: fedalt does not take it ({why})")

    def _weight(self, n_examples: int) -> float:
        return float(n_examples) if self.settings.row_weights == "examples" else 1.0

    # ---- state -----------------------------------------------------------------------------
    def init_server_state(self, trainer) -> State:
        router_for(trainer.adapters)  # evaluation paths load routers through this trainer
        init = trainer.adapters.fresh("global", self.cfg.seed)
        return {INIT: init, INDIVIDUAL: {k: torch.zeros_like(t) for k, t in init.items()}}

    def init_client_state(self, trainer, cid: int) -> State:
        router = router_for(trainer.adapters)
        return {"local": trainer.adapters.fresh("local", self.cfg.seed + 1 + cid),
                ROUTER: router.fresh(self.cfg.seed + 7_919 + cid)}

    # ---- one round -------------------------------------------------------------------------
    def configure_round(self, rnd: int, server_state: State, client_ids) -> dict[int, Message]:
        weights = {int(c): float(w) for c, w in server_state.get(WEIGHTS, {}).items()}
        total, w_total = server_state[INDIVIDUAL], sum(weights.values())
        out = {}
        for cid in client_ids:
            row = rest_of_world(total, w_total, server_state.get(PREFIX + str(cid)), weights.get(cid, 0.0))
            out[cid] = Message(tensors={"row": row if row is not None else server_state[INIT]},
                               config={"round": rnd})
        return out

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        router = router_for(tr.adapters)
        if not state:
            state = self.init_client_state(tr, ctx.cid)
        tr.adapters.set("global", payload.tensors["row"])
        tr.adapters.set("local", state["local"])
        tr.adapters.set(ROUTER, state[ROUTER])
        router.set_trainable(True)
        try:
            stats = tr.train(
                ("client", ctx.cid), ctx.examples, ["local"], {"global": 1.0, "local": 1.0},
                self.cfg.train.local_epochs, ctx.seed, progress=ctx.progress, extra_params=router.parameters(),
            )
        finally:
            router.set_trainable(False)
        local = tr.adapters.get("local")
        return (Message({INDIVIDUAL: local}, len(ctx.examples), stats),
                {"local": local, ROUTER: tr.adapters.get(ROUTER)})

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        new = dict(server_state)
        weights = dict(server_state.get(WEIGHTS, {}))
        for cid, u in sorted(updates.items()):
            new[PREFIX + str(cid)] = u.tensors[INDIVIDUAL]
            weights[str(cid)] = torch.tensor([self._weight(u.num_examples)], dtype=torch.float64)
        new[WEIGHTS] = weights
        cids = sorted(int(c) for c in weights)
        new[INDIVIDUAL] = weighted_sum([(new[PREFIX + str(c)], float(weights[str(c)])) for c in cids],
                                       server_state[INDIVIDUAL])
        return new

    # ---- after training --------------------------------------------------------------------
    def final_payload(self, server_state: State) -> Message:
        weights = server_state.get(WEIGHTS, {})
        tensors = {INDIVIDUAL: server_state[INDIVIDUAL], WEIGHTS: dict(weights)}
        if len(weights) < 2:  # some client has no other upload to learn from: it keeps the init RoW
            tensors[INIT] = server_state[INIT]
        return Message(tensors=tensors)

    def finish_client(self, ctx: ClientContext, final: Message, state: State) -> State:
        """The RoW of the final uploads, from their weighted sum minus this client's own LoRA."""
        router_for(ctx.trainer.adapters)
        if not state:
            state = self.init_client_state(ctx.trainer, ctx.cid)
        weights = {int(c): float(w) for c, w in final.tensors.get(WEIGHTS, {}).items()}
        own = state["local"] if ctx.cid in weights else None
        row = rest_of_world(final.tensors[INDIVIDUAL], sum(weights.values()), own, weights.get(ctx.cid, 0.0))
        return {**state, "row": row if row is not None else final.tensors[INIT]}

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": state["row"], "local": state["local"], ROUTER: state[ROUTER]}

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ("global", "local")

    def eval_mix(self, ctx: ClientContext, instructions) -> tuple[dict[str, Any], torch.Tensor | None]:
        return {"global": 1.0, "local": 1.0}, None
