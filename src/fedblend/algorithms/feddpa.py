"""FedDPA: dual-personalizing adapters (Yang et al., NeurIPS 2024, arXiv 2403.19211).

A global LoRA G (FedAvg'd by the server) and a local LoRA L (never leaves the client) on
one frozen backbone; each layer computes ``h = W0 x + s (w_g B_g A_g x + w_l B_l A_l x)``.

- FedDPA-T (alternating): round 0 trains G only; in rounds >= 1 each client first trains L
  with ``h = W0 x + s (a L x + (1 - a) stopgrad(G x))`` (a = ``feddpa.local_weight``) for
  ``feddpa.local_phase_epochs`` (0 = ``train.local_epochs``), then trains G alone, and uploads
  G. L persists on the client from round to round. Ablation ``feddpa.global_phase_mix = m > 0``
  (the official code's ``--glocal``, m = 0.5): from round 1 the global phase trains G with
  ``h = W0 x + s ((1 - m) G x + m stopgrad(L x))``, so training matches inference's mixing.
- FedDPA-F (fine-tune): FedIT for R rounds; then each client copies the final G into L and
  fine-tunes L alone on its own data for ``feddpa.finetune_epochs``.

Inference weighting (``feddpa.weighting``): ``global`` (G only), ``local`` (L only), ``static``
(one weight w), ``dynamic`` (instance-wise: ``w = lambda * mean top-k cos(e(x), e(s))`` over the
client's own training prompts s, e = last-layer hidden state at the last prompt token with L
active; the reference prompts are embedded once per client and cached).
``feddpa.weighting_convention``: ``intent`` (default) gives w to the LOCAL adapter (an input
that resembles the client's data leans on its own adapter); ``official`` gives w to the
GLOBAL adapter and 1 - w to the local one, as the released code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from fedblend.adapters.lora import DORA_PER_INSTANCE
from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.algorithms.fedit import train_global
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig, Section

PAPER = "Yang et al., NeurIPS 2024, arXiv 2403.19211"


class FedDPASettings(Section):
    """``[feddpa]``: FedDPA-T's training and FedDPA's inference weighting (both variants)."""

    inference_only: ClassVar[frozenset[str]] = frozenset({
        "weighting", "weighting_convention", "static_weight", "dynamic_lambda", "dynamic_top_k",
        "dynamic_reference",
    })

    local_weight: float = Field(0.5, ge=0, le=1, description="FedDPA-T weight a of the local adapter")
    finetune_epochs: float = Field(0, ge=0, description="FedDPA-F local fine-tuning epochs")
    local_phase_epochs: float = Field(
        0, ge=0, description="FedDPA-T local-phase epochs; 0 = train.local_epochs (the global phase's)"
    )
    global_phase_mix: float = Field(
        0.0, ge=0, lt=1,
        description="FedDPA-T 'glocal' ablation: from round 1 the frozen local adapter stays active at "
        "this weight (G at 1 - w) while G trains; 0 = off (G alone), the official --glocal = 0.5",
    )
    weighting: Literal["global", "local", "static", "dynamic"] = "dynamic"
    weighting_convention: Literal["intent", "official"] = "intent"
    static_weight: float = Field(0.5, ge=0, le=1)
    dynamic_lambda: float = Field(0.5, ge=0, le=1)
    dynamic_top_k: int = Field(5, ge=1)
    dynamic_reference: int = Field(0, ge=0, description="max local training prompts embedded; 0 = all")


def dynamic_weights(
    test_emb: torch.Tensor, reference_emb: torch.Tensor, lam: float, top_k: int
) -> torch.Tensor:
    """``lambda * mean of the top-k cosine similarities`` of each test row to the references."""
    a = torch.nn.functional.normalize(test_emb.float(), dim=-1)
    b = torch.nn.functional.normalize(reference_emb.float(), dim=-1)
    sims = a @ b.T
    k = min(top_k, sims.shape[1])
    return lam * sims.topk(k, dim=1).values.mean(dim=1)


class _DualAdapter(Algorithm):
    shared_roles = ("global",)
    paper = PAPER
    section = "feddpa"
    Settings = FedDPASettings

    @classmethod
    def label(cls, cfg: ExperimentConfig) -> str:
        s = cfg.section("feddpa")
        return f"{cls.name}[{s.weighting}" + (f",{s.weighting_convention}]" if s.weighting == "dynamic" else "]")

    def summary_fields(self) -> dict[str, Any]:
        s = self.settings
        return {"weighting": {"mode": s.weighting, "convention": s.weighting_convention}}

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.lora.dora and cfg.section("feddpa").weighting == "dynamic":  # DoRA: G and L each own an m;
            raise ValueError(DORA_PER_INSTANCE)  # L's stays local with L (never in an upload)

    def eval_adapters(self, final: Message, state: State) -> State:
        return {"global": final.tensors["global"], "local": state["local"]}

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ("global", "local")

    def _reference_prompts(self, ctx: ClientContext) -> list[str]:
        prompts = [e.instruction for e in ctx.examples]
        limit = self.settings.dynamic_reference
        if limit and len(prompts) > limit:
            g = torch.Generator().manual_seed(ctx.seed)
            idx = torch.randperm(len(prompts), generator=g)[:limit].sort().values.tolist()
            prompts = [prompts[i] for i in idx]
        return prompts

    def _reference_embeddings(self, ctx: ClientContext) -> torch.Tensor:
        """The client's own training prompts, embedded once (L active) and cached."""
        if "reference_emb" not in ctx.extra:
            ctx.extra["reference_emb"] = ctx.trainer.embed(self._reference_prompts(ctx), {"local": 1.0})
        return ctx.extra["reference_emb"]

    def eval_embeddings(self, ctx: ClientContext, instructions: Sequence[str]) -> tuple[dict[str, float], list[str]] | None:
        if self.settings.weighting != "dynamic":
            return None
        refs = [] if "reference_emb" in ctx.extra else self._reference_prompts(ctx)
        return {"local": 1.0}, list(instructions) + refs

    def eval_mix(self, ctx: ClientContext, instructions: Sequence[str]) -> tuple[dict[str, Any], torch.Tensor | None]:
        ec = self.settings
        if ec.weighting == "global":
            return {"global": 1.0}, None
        if ec.weighting == "local":
            return {"local": 1.0}, None
        if ec.weighting == "static":
            w: Any = ec.static_weight
            record = None
        else:
            ref = self._reference_embeddings(ctx)
            emb = ctx.trainer.embed(list(instructions), {"local": 1.0})
            w = dynamic_weights(emb, ref, ec.dynamic_lambda, ec.dynamic_top_k)
            record = w
        if ec.weighting_convention == "intent":
            return {"local": w, "global": 1 - w}, record
        return {"global": w, "local": 1 - w}, record


class FedDPAT(_DualAdapter):
    name = "feddpa_t"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.lora.dora and cfg.lora.dropout > 0:  # see fedblend.adapters.lora: DoRA mixing
            raise ValueError(
                "lora.dropout: FedDPA-T trains two DoRA adapters mixed, and with dropout PEFT adds each "
                "adapter's DoRA term to W0 x while without it (as at inference) each rescales the output "
                "before it: training would not match inference; set lora.dropout = 0 with lora.dora")

    def init_client_state(self, trainer, cid: int) -> State:
        return {"local": trainer.adapters.fresh("local", self.cfg.seed + 1 + cid)}

    def _local_phase_epochs(self) -> float:
        return self.settings.local_phase_epochs or self.cfg.train.local_epochs

    def update_steps(self, n_examples: int, rnd: int, trainer) -> int:
        steps = trainer.train_steps(n_examples, self.cfg.train.local_epochs)
        return steps if rnd == 0 else steps + trainer.train_steps(n_examples, self._local_phase_epochs())

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        tr, tc, st = ctx.trainer, self.cfg.train, self.settings
        metrics: dict[str, float] = {}
        tr.adapters.set("local", state["local"])
        mix = None
        if ctx.round >= 1:
            # local phase: L trains beside a stop-gradient copy of the received G
            tr.adapters.set("global", payload.tensors["global"])
            a = st.local_weight
            stats = tr.train(
                ("client", ctx.cid), ctx.examples, ["local"], {"local": a, "global": 1 - a},
                self._local_phase_epochs(), ctx.seed + 1, progress=ctx.progress,
            )
            metrics["loss_local"] = stats["loss"]
            if st.global_phase_mix > 0:  # "glocal": the frozen L stays active while G trains
                mix = {"global": 1 - st.global_phase_mix, "local": st.global_phase_mix}
        update = train_global(ctx, payload, tc.local_epochs, mix=mix)  # global phase
        update.metrics = {**update.metrics, **metrics}
        return update, {"local": tr.adapters.get("local")}


class FedDPAF(_DualAdapter):
    name = "feddpa_f"

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.section("feddpa").finetune_epochs <= 0:
            raise ValueError("feddpa.finetune_epochs: must be > 0 for feddpa_f")

    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        return train_global(ctx, payload, self.cfg.train.local_epochs), state

    def finish_steps(self, n_examples: int, trainer) -> int:
        return trainer.train_steps(n_examples, self.settings.finetune_epochs)

    def finish_client(self, ctx: ClientContext, final: Message, state: State) -> State:
        tr = ctx.trainer
        tr.adapters.set("local", final.tensors["global"])  # L starts as the final G
        tr.train(
            ("client", ctx.cid), ctx.examples, ["local"], {"local": 1.0},
            self.settings.finetune_epochs, ctx.seed, progress=ctx.progress,
        )
        return {"local": tr.adapters.get("local")}
