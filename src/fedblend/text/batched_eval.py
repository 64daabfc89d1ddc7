"""Cross-client batched P/TTP: every client's model answers every task in shared batches.

Client after client (:func:`fedblend.text.protocol.evaluate_client`), each (client, task) pair
is one ``generate`` call: with few test instances per task the batches are small, and the
frozen backbone runs once per client. Here the rows of every (client, task) pair that needs
generating are packed together, sorted by prompt length and cut into batches of
``eval.batch_size`` as ``TextTrainer.generate`` does, and each row uses its own client's LoRA
tensors through :class:`~fedblend.adapters.batched.CrossClientLoRA` and its own mixing weights
through the per-instance scaling. What stays per client is ``eval_mix`` (FedDPA's dynamic
weights embed the inputs with the client's own local adapter against its own cached reference
embeddings): it is called once per client with all of its tasks' inputs and the client's
adapters loaded; the embeddings it asks for (``Algorithm.eval_embeddings``) are computed
beforehand for all clients in shared batches the same way (:func:`embed_across_clients`) and
handed back to it by ``TextTrainer.known_embeddings``. Identical client models
(same adapters and fixed mixing, e.g. FedIT) are still generated for once and shared, and
counted the same way in ``ClientEval.generated``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedblend.adapters.batched import CrossClientLoRA
from fedblend.algorithms.base import State


@dataclass
class Job:
    """One (client, task) pair generated for: rows ``start:start + n`` of the packed inputs."""

    cid: int
    task: str
    start: int
    n: int
    mix: dict[str, Any]
    model: int
    preds: list[str] | None = None


def batchable(trainer, adapters: Mapping[int, State]) -> bool:
    """True when every client's eval adapters are the same LoRA roles of ``trainer``."""
    roles = {frozenset(a) for a in adapters.values()}
    if len(roles) != 1 or trainer.adapters.cfg.dora:
        # DoRA: PEFT's DoRA forward builds B A from the lora_A / lora_B modules (an identity
        # batch through them) and normalises with one magnitude per layer; the row-select
        # modules give each batch row its own B A, which it cannot take: client after client
        return False
    own = trainer.adapters.params
    lora = trainer.adapters.roles  # attached non-LoRA roles (FedALT's router) cannot be row-selected
    return all(
        role in lora and set(tensors) == set(own[role]) for a in adapters.values() for role, tensors in a.items()
    )


def generate_across_clients(
    trainer, models: list[State], jobs: list[Job], texts: list[str],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fill every job's ``preds``: ``texts`` packs the jobs' inputs (job ``j`` owns rows
    ``j.start : j.start + j.n``), generated in shared batches, row by row with the adapters of
    ``models[j.model]`` and the job's mixing weights."""
    xc = CrossClientLoRA(trainer.adapters, models)
    index = torch.tensor([j.model for j in jobs for _ in range(j.n)], dtype=torch.long, device=xc.device)
    with xc.active():
        preds = trainer.generate(
            texts, _row_weights(jobs, xc.device), progress=progress,
            batch_context=lambda idx: xc.rows(index[idx]),
        )
    for job in jobs:
        job.preds = preds[job.start : job.start + job.n]


def embed_across_clients(
    trainer, models: list[State], texts: list[list[str]], mix: Mapping[str, float]
) -> list[dict[str, torch.Tensor]]:
    """``trainer.embed`` under ``mix`` of each ``texts[m]`` with ``models[m]``'s adapters, all
    in shared batches; one ``{text: embedding}`` per model."""
    unique = [list(dict.fromkeys(t)) for t in texts]
    flat = [x for u in unique for x in u]
    used = [{r: m[r] for r in m if r in mix} for m in models]  # roles weighted 0 play no part
    xc = CrossClientLoRA(trainer.adapters, used)
    index = torch.tensor([m for m, u in enumerate(unique) for _ in u], dtype=torch.long, device=xc.device)
    with xc.active():
        rows = trainer.embed(flat, mix, batch_context=lambda idx: xc.rows(index[idx]))
    out, start = [], 0
    for u in unique:
        out.append(dict(zip(u, rows[start : start + len(u)], strict=True)))
        start += len(u)
    return out


def _row_weights(jobs: list[Job], device: torch.device) -> dict[str, Any]:
    """Each role's mixing weight per packed row; a plain float where every row has the same
    float (as the client-after-client path passes it). Roles a job does not name weigh 0."""
    roles = sorted({r for j in jobs for r in j.mix})
    out: dict[str, Any] = {}
    for role in roles:
        vals = [j.mix.get(role, 0.0) for j in jobs]
        if not any(isinstance(v, torch.Tensor) for v in vals) and len(set(vals)) == 1:
            out[role] = vals[0]
            continue
        parts = [
            v.to(device=device, dtype=torch.float32).reshape(-1)
            if isinstance(v, torch.Tensor)
            else torch.full((j.n,), float(v), dtype=torch.float32, device=device)
            for v, j in zip(vals, jobs, strict=True)
        ]
        out[role] = torch.cat(parts)
    return out
