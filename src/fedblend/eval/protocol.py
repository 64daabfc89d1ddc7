"""P and TTP for text federations.

P(k) = client k's model on its own task's test examples; TTP(k) = the same model on every
client's task, averaged (own task included). Client models that are identical (the same
adapters and the same fixed mixing, as in FedIT) are evaluated once and shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedblend.algorithms.base import Algorithm, ClientContext, State, load_into
from fedblend.comm.codec import Message
from fedblend.data.federation import Federation
from fedblend.eval.metrics import METRICS, score


@dataclass
class ClientEval:
    task: str
    scores: dict[str, dict[str, float]]  # task -> metric -> value
    weights: dict[str, list[float]] = field(default_factory=dict)  # task -> per-instance weight
    predictions: dict[str, list[str]] = field(default_factory=dict)
    generated: int = 0  # instances this client's model generated for (0 where shared from another)


def _fingerprint(adapters: State, mix: dict[str, Any]) -> str | None:
    h = hashlib.sha256()
    for role in sorted(adapters):
        for k in sorted(adapters[role]):
            h.update(role.encode() + k.encode())
            h.update(adapters[role][k].detach().cpu().numpy().tobytes())
    for role in sorted(mix):
        w = mix[role]
        if isinstance(w, torch.Tensor):
            return None  # instance-wise weights: never shared
        h.update(f"{role}={w}".encode())
    return h.hexdigest()


def evaluate_client(
    algorithm: Algorithm,
    trainer,
    fed: Federation,
    ctx: ClientContext,
    final: Message,
    state: State,
    ttp: bool,
    cache: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> ClientEval:
    """Score one client's model (its eval adapters and mixing) on its own task, and on every
    task when ``ttp``. Runs where the client's private state is (in-process or on a node)."""
    client = fed.client(ctx.cid)
    adapters = algorithm.eval_adapters(final, state)
    load_into(trainer, adapters)
    tasks: Sequence[str] = fed.tasks if ttp else [client.task]
    ev = ClientEval(task=client.task, scores={})
    for task in tasks:
        examples = fed.test_by_task[task]
        instructions = [e.instruction for e in examples]
        mix, weights = algorithm.eval_mix(ctx, instructions)
        key = _fingerprint(adapters, mix) if cache is not None else None
        if key is not None and (key, task) in cache:
            ev.scores[task], ev.predictions[task] = cache[(key, task)]
            if progress:
                progress(len(examples))
            continue
        preds = trainer.generate(instructions, mix, progress=progress)
        ev.generated += len(examples)
        ev.scores[task] = score(preds, [e.output for e in examples])
        ev.predictions[task] = preds
        if weights is not None:
            ev.weights[task] = [float(w) for w in weights]
        if key is not None:
            cache[(key, task)] = (ev.scores[task], preds)
    return ev


def evaluate_text(
    algorithm: Algorithm,
    trainer,
    fed: Federation,
    finals: dict[int, Message],
    client_states: dict[int, State],
    contexts: dict[int, ClientContext],
    ttp: bool,
    progress: Callable[[int], None] | None = None,
    dedupe: bool = True,
) -> dict[int, ClientEval]:
    """Every client's evaluation; identical client models are generated for only once unless
    ``dedupe`` is off (to time every client's inference, as the cost benchmark does)."""
    cache: dict | None = {} if dedupe else None
    return {
        c.cid: evaluate_client(
            algorithm, trainer, fed, contexts[c.cid], finals[c.cid],
            client_states.get(c.cid, {}), ttp, cache=cache, progress=progress,
        )
        for c in fed.clients
    }


def summarize(results: dict[int, ClientEval], metric: str) -> dict[str, Any]:
    """Per-client P/TTP (primary metric) with per-metric detail, and their means."""
    clients: dict[str, Any] = {}
    for cid, ev in results.items():
        own = ev.scores[ev.task]
        per_metric = {
            m: {
                "P": own[m],
                "TTP": sum(s[m] for s in ev.scores.values()) / len(ev.scores),
            }
            for m in METRICS
        }
        clients[str(cid)] = {
            "task": ev.task,
            "P": per_metric[metric]["P"],
            "TTP": per_metric[metric]["TTP"],
            "metrics": per_metric,
            "by_task": {t: s[metric] for t, s in ev.scores.items()},
        }
    n = max(1, len(clients))
    mean = {
        "P": sum(c["P"] for c in clients.values()) / n,
        "TTP": sum(c["TTP"] for c in clients.values()) / n,
    }
    mean_by_metric = {
        m: {k: sum(c["metrics"][m][k] for c in clients.values()) / n for k in ("P", "TTP")}
        for m in METRICS
    }
    return {"clients": clients, "mean": mean, "mean_by_metric": mean_by_metric}
