"""P and TTP for text federations.

P(k) = client k's model on its own task's test examples; TTP(k) = the same model on every
client's task, averaged (own task included). Client models that are identical (the same
adapters and the same fixed mixing, as in FedIT) are evaluated once and shared. With
``eval.cross_client_batch`` the clients' generations share batches (:mod:`fedblend.text.batched_eval`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedblend.algorithms.base import Algorithm, ClientContext, State, load_into
from fedblend.comm.codec import Message
from fedblend.text.batched_eval import Job, batchable, embed_across_clients, generate_across_clients
from fedblend.text.federation import ClientData, Federation
from fedblend.text.metrics import METRICS, score
from fedblend.text.sources import Example


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
    tasks: Sequence[str] | None = None,
) -> ClientEval:
    """Score one client's model (its eval adapters and mixing) on its own task, and on every
    task when ``ttp`` (or on ``tasks``: a sampled evaluation's). Runs where the client's
    private state is (in-process or on a node)."""
    client = fed.client(ctx.cid)
    adapters = algorithm.eval_adapters(final, state)
    load_into(trainer, adapters)
    if tasks is None:
        tasks = fed.tasks if ttp else [client.task]
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
    cross_client: bool = True,
    tasks_for: dict[int, list[str]] | None = None,
) -> dict[int, ClientEval]:
    """Every client's evaluation; identical client models are generated for only once unless
    ``dedupe`` is off (to time every client's inference, as the cost benchmark does).
    ``cross_client``: generate for all clients in shared batches where their eval adapters are
    LoRA roles of the trainer (else, or when off, client after client). ``tasks_for``: the
    tasks each client is scored on (a sampled evaluation's :class:`EvalPlan`); default its own,
    and every task with ``ttp``."""
    if cross_client:
        batched = evaluate_text_batched(
            algorithm, trainer, fed, finals, client_states, contexts, ttp, progress, dedupe, tasks_for
        )
        if batched is not None:
            return batched
    cache: dict | None = {} if dedupe else None
    return {
        c.cid: evaluate_client(
            algorithm, trainer, fed, contexts[c.cid], finals[c.cid],
            client_states.get(c.cid, {}), ttp, cache=cache, progress=progress,
            tasks=tasks_for[c.cid] if tasks_for is not None else None,
        )
        for c in fed.clients
    }


def evaluate_text_batched(
    algorithm: Algorithm,
    trainer,
    fed: Federation,
    finals: dict[int, Message],
    client_states: dict[int, State],
    contexts: dict[int, ClientContext],
    ttp: bool,
    progress: Callable[[int], None] | None = None,
    dedupe: bool = True,
    tasks_for: dict[int, list[str]] | None = None,
) -> dict[int, ClientEval] | None:
    """:func:`evaluate_text` with every client's generations packed into shared batches; None
    where the eval adapters are not LoRA roles of the trainer. Each client's ``eval_mix`` runs
    with its own adapters loaded, once over all of its tasks' inputs (FedDPA's dynamic weights
    are per instance), so mixing weights are those client after client computes."""
    adapters = {c.cid: algorithm.eval_adapters(finals[c.cid], client_states.get(c.cid, {}))
                for c in fed.clients}
    if not batchable(trainer, adapters):
        return None
    cache: dict | None = {} if dedupe else None
    results: dict[int, ClientEval] = {}
    models: list[State] = []
    texts: list[str] = []
    jobs: list[Job] = []
    shared: list[tuple[int, str, Job]] = []
    tasks: Sequence[str] = fed.tasks
    inputs = {t: [e.instruction for e in fed.test_by_task[t]] for t in tasks}
    own = {c.cid: (tasks_for[c.cid] if tasks_for is not None else tasks if ttp else [c.task])
           for c in fed.clients}
    flat = {c.cid: [x for t in own[c.cid] for x in inputs[t]] for c in fed.clients}
    known = _embedded(algorithm, trainer, fed, contexts, adapters, flat)
    for c in fed.clients:
        load_into(trainer, adapters[c.cid])
        ev = results[c.cid] = ClientEval(task=c.task, scores={})
        mix_emb, rows_known = known.get(c.cid, ({}, {}))
        with trainer.known_embeddings(mix_emb, rows_known):
            mix_all, record = algorithm.eval_mix(contexts[c.cid], flat[c.cid])
        offset = 0
        for task in own[c.cid]:
            rows = slice(offset, offset + len(inputs[task]))
            offset = rows.stop
            mix = {r: (w[rows] if isinstance(w, torch.Tensor) else w) for r, w in mix_all.items()}
            key = _fingerprint(adapters[c.cid], mix) if cache is not None else None
            if key is not None and (key, task) in cache:
                shared.append((c.cid, task, cache[(key, task)]))
                if progress:
                    progress(len(inputs[task]))
                continue
            if not models or models[-1] is not adapters[c.cid]:
                models.append(adapters[c.cid])
            job = Job(c.cid, task, len(texts), len(inputs[task]), mix, len(models) - 1)
            jobs.append(job)
            texts.extend(inputs[task])
            ev.generated += job.n
            if record is not None:
                ev.weights[task] = [float(w) for w in record[rows]]
            if key is not None:
                cache[(key, task)] = job
    if jobs:
        generate_across_clients(trainer, models, jobs, texts, progress)
    for job in jobs:
        preds = job.preds or []
        results[job.cid].scores[job.task] = score(preds, [e.output for e in fed.test_by_task[job.task]])
        results[job.cid].predictions[job.task] = preds
    for cid, task, job in shared:
        results[cid].scores[task] = results[job.cid].scores[job.task]
        results[cid].predictions[task] = results[job.cid].predictions[job.task]
    for cid, ev in results.items():  # task order, as client after client
        order = own[cid]
        ev.scores = {t: ev.scores[t] for t in order}
        ev.predictions = {t: ev.predictions[t] for t in order}
    return results


def _embedded(algorithm: Algorithm, trainer, fed: Federation, contexts: dict[int, ClientContext],
              adapters: dict[int, State], inputs: dict[int, list[str]]) -> dict[int, tuple[dict, dict]]:
    """The embeddings every client's ``eval_mix`` will ask for (``Algorithm.eval_embeddings``),
    computed for all clients in shared batches: cid -> (mixing, {text: embedding})."""
    plans = {c.cid: algorithm.eval_embeddings(contexts[c.cid], inputs[c.cid]) for c in fed.clients}
    wanted = {cid: p for cid, p in plans.items() if p is not None}
    mixes = [p[0] for p in wanted.values()]
    if not wanted or any(m != mixes[0] for m in mixes):
        return {}
    rows = embed_across_clients(trainer, [adapters[cid] for cid in wanted],
                                [p[1] for p in wanted.values()], mixes[0])
    return {cid: (mixes[0], r) for cid, r in zip(wanted, rows, strict=True)}


def summarize(results: dict[int, ClientEval], metric: str, plan: EvalPlan | None = None) -> dict[str, Any]:
    """Per-client P/TTP (primary metric) with per-metric detail, and their means. With a
    sampled ``plan``, TTP is its estimate (:func:`ttp_estimate`)."""
    clients: dict[str, Any] = {}
    for cid, ev in results.items():
        own = ev.scores[ev.task]
        per_metric = {
            m: {
                "P": own[m],
                "TTP": ttp_estimate(ev, m, plan) if plan is not None and plan.sampled
                else sum(s[m] for s in ev.scores.values()) / len(ev.scores),
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


# ---- evaluation at population scale ------------------------------------------------------
POOLED = "pooled"  # the pseudo-task of a label-skew federation's pooled test set


@dataclass
class EvalPlan:
    """Which clients are evaluated, on which tasks. Exact (``sampled`` False): every client on
    its own task, and on every task with TTP, as the papers' protocol. Sampled: a seeded
    sample of clients, each on its own task and, for TTP, on a seeded sample of the other
    clients' tasks (``ttp = "tasks"``) or on one pooled test set (``"pooled"``)."""

    sampled: bool
    clients: list[int]
    tasks: dict[int, list[str]]  # per evaluated client, the tasks it is scored on
    n_clients: int  # in the federation
    n_tasks: int
    ttp: str  # "all" | "tasks" | "pooled" | "off"
    pooled: list[Example] = field(default_factory=list)
    pooled_size: int = 0  # len(pooled); a plan rebuilt from nodes' replies knows only the size

    @classmethod
    def from_replies(cls, n_clients: int, facts: dict[str, Any], tasks: dict[int, list[str]]) -> EvalPlan:
        """The plan as the Flower ServerApp knows it: from the evaluated nodes' replies, each
        with its plan's :meth:`facts` and the tasks it was scored on."""
        return cls(bool(facts["sampled"]), sorted(tasks), dict(sorted(tasks.items())), n_clients,
                   int(facts["n_tasks"]), str(facts["ttp"]), pooled_size=int(facts["pooled_size"]))

    def facts(self) -> dict[str, Any]:
        """What a node tells the server of the plan, besides its tasks (:meth:`from_replies`)."""
        return {"sampled": self.sampled, "n_tasks": self.n_tasks, "ttp": self.ttp, "pooled_size": self.pooled_size}

    def record(self) -> dict[str, Any]:
        """The sample sizes, as summary.json's ``evaluation`` records them."""
        others = [len(ts) - 1 for ts in self.tasks.values()]
        return {
            "mode": "sampled" if self.sampled else "exact",
            "clients": self.n_clients,
            "clients_evaluated": len(self.clients),
            "tasks": self.n_tasks,
            "ttp": self.ttp,
            "ttp_other_tasks_per_client": (min(others) if others else 0) if self.ttp in ("all", "tasks") else 0,
            "pooled_test_instances": self.pooled_size,
        }


def eval_sample(cfg: Any, ids: Sequence[int]) -> list[int] | None:
    """The clients a sampled evaluation scores (seeded by ``cfg.seed``), or None when every
    client is scored exactly. Needs only the client ids: the Flower ServerApp, which holds no
    data, picks the same clients as the in-process engine."""
    ec = cfg.eval
    if not (ec.clients > 0 or (ec.exact_max_clients > 0 and len(ids) > ec.exact_max_clients)):
        return None
    return sorted(random.Random(f"eval-clients:{cfg.seed}").sample(sorted(ids), ec.clients or ec.exact_max_clients))


def eval_plan(cfg: Any, fed: Federation) -> EvalPlan:
    """The evaluation of ``fed`` that ``cfg.eval`` asks for (seeded by ``cfg.seed``)."""
    ec = cfg.eval
    ids = [c.cid for c in fed.clients]
    n = len(ids)
    chosen = eval_sample(cfg, ids)
    if chosen is None:
        tasks = {c.cid: (list(fed.tasks) if ec.ttp else [c.task]) for c in fed.clients}
        return EvalPlan(False, ids, tasks, n, len(fed.tasks), "all" if ec.ttp else "off")
    by_id = {c.cid: c for c in fed.clients}
    all_tasks = fed.tasks
    pooled: list[Example] = []
    if not ec.ttp:
        mode = "off"
    elif ec.pooled_test > 0 and cfg.data.layout == "label_skew" and cfg.data.kind != "synthetic":
        mode = "pooled"
        rng = random.Random(f"eval-pooled:{cfg.seed}")
        # a task drawn uniformly, then one of its instances: the pooled mean estimates the
        # mean over every task of its mean score, as TTP averages them
        for _ in range(ec.pooled_test):
            e = rng.choice(fed.test_by_task[rng.choice(all_tasks)])
            pooled.append(Example(e.instruction, e.output, POOLED, e.label))
    else:
        mode = "tasks"
    tasks: dict[int, list[str]] = {}
    for cid in chosen:
        own = by_id[cid].task
        if mode == "off":
            tasks[cid] = [own]
        elif mode == "pooled":
            tasks[cid] = [own, POOLED]
        else:
            others = [t for t in all_tasks if t != own]
            pick = set(random.Random(f"eval-tasks:{cfg.seed}:{cid}").sample(others, min(ec.ttp_tasks, len(others))))
            tasks[cid] = [t for t in all_tasks if t == own or t in pick]
    return EvalPlan(True, chosen, tasks, n, len(all_tasks), mode, pooled, len(pooled))


def plan_view(fed: Federation, plan: EvalPlan) -> Federation:
    """The federation as the evaluation sees it: the evaluated clients and the test sets of
    the tasks they are scored on (the pooled set among them)."""
    if not plan.sampled:
        return fed
    by_id = {c.cid: c for c in fed.clients}
    needed = {t for ts in plan.tasks.values() for t in ts}
    tests = {t: v for t, v in fed.test_by_task.items() if t in needed}
    if plan.pooled:
        tests[POOLED] = plan.pooled
    return Federation([ClientData(cid, by_id[cid].task, by_id[cid].train) for cid in plan.clients], tests)


def ttp_estimate(ev: ClientEval, metric: str, plan: EvalPlan) -> float:
    """A sampled evaluation's TTP of one client: the pooled set's score, or
    ``(own + (T - 1) * mean over the sampled other tasks) / T`` (T tasks in the federation),
    which is the exact TTP when every other task is sampled."""
    own = ev.scores[ev.task][metric]
    if plan.ttp == "pooled":
        return ev.scores[POOLED][metric]
    others = [s[metric] for t, s in ev.scores.items() if t != ev.task]
    if plan.ttp == "off" or not others:
        return own
    t = plan.n_tasks
    return (own + (t - 1) * sum(others) / len(others)) / t
