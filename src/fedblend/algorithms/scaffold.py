"""SCAFFOLD on the LoRA tensors (Karimireddy et al., ICML 2020), option II as OpenFedLLM
applies it (Ye et al., KDD 2024): see ``METHODS.md`` section 9.

State: the server holds ``x`` (the global LoRA, role ``global``) and ``c`` (the server control
variate, role ``control``, zeros like ``x``); each client holds its ``c_i`` (role ``control``
of its private state, zeros at first). Every tensor of the LoRA role takes part: A, B and,
with DoRA, the magnitude vectors.

Round t:

- server -> client i: ``x`` and ``c`` (2x FedIT down);
- client i: ``y <- x``; ``corr = c - c_i``; K AdamW steps at the trainer's learning rates
  ``lr_1 .. lr_K`` (warm-up and linear decay included), and

  * ``variant = "option2"`` (default, OpenFedLLM): after every optimizer step
    ``y <- y - lr_k corr`` (in place, no gradient);
  * ``variant = "pure"``: ``corr`` is added to the (clipped) gradient before every step;

  then option II with the steps and rates actually used: ``c_i+ = c_i - c + (x - y) / sum_k lr_k``
  (OpenFedLLM's ``K eta`` is the sum of a constant rate), ``delta c_i = c_i+ - c_i``;
- client i -> server: ``y_i`` and ``c + delta c_i`` under role ``control`` (2x FedIT up). The
  control travels as the server's ``c`` plus the client's change, as every shared tensor does
  (the server's value plus the client's delta): update validation, compression and
  ``aggregate.max_update_norm`` then act on ``delta c_i``; the server takes
  ``delta c_i = u_i - c`` back (one float32 rounding of ``c``);
- server: ``x <- sum_i n_i y_i / sum_i n_i`` (then ``train.server_lr`` / ``server_momentum``
  on x, SCAFFOLD's global step), ``c <- c + (1/N) sum_{i in S_t} delta c_i`` with N = every
  client of the federation (clients that sit out keep their ``c_i``).

Evaluation: the global ``x``, as FedIT. The aggregation is not one weighted mean (``c`` is an
unweighted sum over N), so robust rules, update clipping and DP are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from fedblend.aggregation.fedavg import weighted_mean
from fedblend.algorithms.base import Algorithm, ClientContext, State, Tensors
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig, Section

CONTROL = "control"


class ScaffoldSettings(Section):
    """``[scaffold]``."""

    variant: Literal["option2", "pure"] = Field(
        "option2", description="option2: y <- y - lr (c - c_i) after every optimizer step (OpenFedLLM); "
        "pure: (c - c_i) added to the gradient before every step",
    )


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def client_control(c: Tensors, c_i: Tensors, x: Tensors, y: Tensors, lr_sum: float) -> Tensors:
    """Option II: ``c_i+ = c_i - c + (x - y) / lr_sum`` (``c_i`` unchanged when no step moved)."""
    if lr_sum <= 0:
        return {k: _f32(v).clone() for k, v in c_i.items()}
    return {k: _f32(c_i[k]) - _f32(c[k]) + (_f32(x[k]) - _f32(y[k])) / lr_sum for k in c}


def server_control(c: Tensors, deltas: list[Tensors], n_clients: int) -> Tensors:
    """``c + (1/N) sum_i delta c_i`` over the clients that answered, N = every client."""
    out = {k: _f32(v).clone() for k, v in c.items()}
    for d in deltas:
        for k in out:
            out[k] += _f32(d[k]) / n_clients
    return out


def total_clients(cfg: Any) -> int:
    """N: the federation's clients as the config gives them."""
    return len(cfg.data.clients) or cfg.data.num_clients


class Scaffold(Algorithm):
    name = "scaffold"
    modality = "text"
    paper = ("Karimireddy et al., ICML 2020, arXiv 1910.06378; on LoRA as OpenFedLLM "
             "(Ye et al., KDD 2024, arXiv 2402.06954)")
    section = "scaffold"
    Settings = ScaffoldSettings
    shared_roles = ("global", CONTROL)
    mean_aggregation = False  # c is an unweighted sum over N clients, not a mean of the updates

    @classmethod
    def label(cls, cfg: ExperimentConfig) -> str:
        return cls.name if cfg.section(cls.section).variant == "option2" else f"{cls.name} (pure)"

    # ---- state -----------------------------------------------------------------------------
    def init_server_state(self, trainer) -> State:
        x = trainer.adapters.fresh("global", self.cfg.seed)
        return {"global": x, CONTROL: {k: torch.zeros_like(v, dtype=torch.float32) for k, v in x.items()}}

    def init_client_state(self, trainer, cid: int) -> State:
        return {CONTROL: {k: torch.zeros(p.shape, dtype=torch.float32)
                          for k, p in trainer.adapters.params["global"].items()}}

    # ---- client ----------------------------------------------------------------------------
    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr = ctx.trainer
        x, c = payload.tensors["global"], payload.tensors[CONTROL]
        c_i = state.get(CONTROL) or self.init_client_state(tr, ctx.cid)[CONTROL]
        tr.adapters.set("global", x)
        live = tr.adapters.params["global"]
        corr = {k: (_f32(c[k]) - _f32(c_i[k])).to(p.device) for k, p in live.items()}
        lrs: list[float] = []
        pure = self.settings.variant == "pure"

        def before(lr: float) -> None:
            if pure:
                add_to_gradients(live, corr)

        def after(lr: float) -> None:
            lrs.append(lr)
            if not pure:
                correct_step(live, corr, lr)

        stats = tr.train(
            ("client", ctx.cid), ctx.examples, ["global"], {"global": 1.0}, self.cfg.train.local_epochs,
            ctx.seed, progress=ctx.progress, before_step=before, after_step=after,
        )
        y = tr.adapters.get("global")
        c_new = client_control(c, c_i, x, y, sum(lrs))
        sent = {k: _f32(c[k]) + (c_new[k] - _f32(c_i[k])) for k in c}  # c + delta c_i
        return Message({"global": y, CONTROL: sent}, len(ctx.examples), stats), {CONTROL: c_new}

    # ---- server ----------------------------------------------------------------------------
    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        if not updates:
            return server_state
        c = server_state[CONTROL]
        x = weighted_mean([(u.tensors["global"], float(u.num_examples)) for _, u in sorted(updates.items())])
        deltas = [{k: _f32(u.tensors[CONTROL][k]) - _f32(c[k]) for k in c} for _, u in sorted(updates.items())]
        # FedAvgM / server_lr act on x only: control stays the same object, which server_update skips
        out = self.server_update({**server_state, "global": x}, server_state)
        out[CONTROL] = server_control(c, deltas, total_clients(self.cfg))
        return out

    def final_payload(self, server_state: State) -> Message:
        return Message(tensors={"global": server_state["global"]})

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": final.tensors["global"]}


def correct_step(params: Mapping[str, torch.nn.Parameter], corr: Mapping[str, torch.Tensor], lr: float) -> None:
    """Option II's post-step correction ``y <- y - lr (c - c_i)``, in place."""
    with torch.no_grad():
        for k, p in params.items():
            if p.requires_grad:
                p.sub_(corr[k].to(p.dtype), alpha=lr)


def add_to_gradients(params: Mapping[str, torch.nn.Parameter], corr: Mapping[str, torch.Tensor]) -> None:
    """The pure variant: ``grad <- grad + (c - c_i)`` before the optimizer step."""
    for k, p in params.items():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = corr[k].to(p.dtype).clone()
        else:
            p.grad.add_(corr[k].to(p.grad.dtype))
