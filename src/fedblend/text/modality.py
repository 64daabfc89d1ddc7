"""The text modality: instruction federations, a frozen LM with LoRA roles, P/TTP by generation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message
from fedblend.modality import Evaluation, Modality, Prepared, peak_rss_mb
from fedblend.plain_progress import label, say
from fedblend.stats import cluster_bootstrap, distribution
from fedblend.store.rundir import RunDir
from fedblend.text.backbone import backbone_bytes
from fedblend.text.metrics import score
from fedblend.text.protocol import (
    ClientEval,
    EvalPlan,
    eval_plan,
    eval_sample,
    evaluate_client,
    evaluate_text,
    plan_view,
    summarize,
)
from fedblend.trust import last_privacy

ROUND_P = "eval/p_per_round.json"


class _EveryKRounds:
    """Wraps an algorithm: every ``eval.every`` rounds, the new global adapter's P on the
    evaluated clients' own test sets (the final evaluation's clients), with its interval when
    they are a sample. A resumed run keeps the rounds it already scored."""

    def __init__(self, algorithm: Algorithm, trainer: Any, fed: Any, plan: EvalPlan, run: RunDir,
                 start_round: int) -> None:
        self._a, self._tr, self._fed, self._plan, self._run = algorithm, trainer, fed, plan, run
        saved = run.path / ROUND_P
        old = json.loads(saved.read_text()) if saved.is_file() else []
        self.history: list[dict[str, Any]] = [r for r in old if r["round"] <= start_round]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        new = self._a.aggregate(rnd, updates, server_state)
        cfg = self._a.cfg
        if (rnd + 1) % cfg.eval.every == 0 and "global" in new:
            self._tr.adapters.set("global", new["global"])
            by_task: dict[str, float] = {}
            own = {cid: ts[0] for cid, ts in self._plan.tasks.items()}
            for task in dict.fromkeys(own.values()):
                examples = self._fed.test_by_task[task]
                preds = self._tr.generate([e.instruction for e in examples], {"global": 1.0})
                by_task[task] = score(preds, [e.output for e in examples])[cfg.eval.metric]
            ps = [by_task[t] for t in own.values()]
            rec: dict[str, Any] = {"round": rnd + 1, "P": sum(ps) / len(ps), "clients": len(ps)}
            if self._plan.sampled:
                ci = cluster_bootstrap(ps, seed=cfg.seed)
                rec.update(lo=ci["lo"], hi=ci["hi"])
            self.history.append(rec)
            self._run.write_json(ROUND_P, self.history)
        return new


class TextModality(Modality):
    name = "text"

    def build_federation(self) -> Any:
        from fedblend.text.federation import build_federation

        return build_federation(self.cfg)

    def describe(self, fed: Any) -> dict[str, Any]:
        return {"data": {
            "clients": len(fed.clients),
            "train_examples": {str(c.cid): len(c.train) for c in fed.clients},
            "test_examples": {t: len(v) for t, v in fed.test_by_task.items()},
        }}

    def load_trainer(self, desc: dict[str, Any]) -> Any:
        from fedblend.text.backbone import load_text_backbone
        from fedblend.text.trainer import TextTrainer

        backbone, tok = load_text_backbone(self.cfg.model, self.cfg.seed, self.device)
        return TextTrainer(self.cfg, backbone, tok)

    def prepare(self, trainer: Any, fed: Any, algorithm: Algorithm, progress: Any,
                cids: Sequence[int] | None = None, evaluation: bool = True) -> Prepared:
        self._fed = fed
        clients = [c for c in fed.clients if cids is None or c.cid in cids]
        if algorithm.pools_data:
            train_data: dict[int, Sequence[Any]] = {0: [e for c in fed.clients for e in c.train]}
        else:
            train_data = {c.cid: c.train for c in clients}
        return Prepared(train_data=train_data, examples={c.cid: c.train for c in clients})

    def node_info(self, fed: Any, client: Any) -> dict[str, Any]:
        return {**super().node_info(fed, client), "task": client.task}

    # ---- evaluation -----------------------------------------------------------------------
    def plan(self, fed: Any) -> EvalPlan:
        """The evaluation plan of ``fed`` (exact, or a seeded sample): made once per federation."""
        cached = getattr(self, "_plan", None)
        if cached is None or cached[0] is not fed:
            self._plan = (fed, eval_plan(self.cfg, fed))
        return self._plan[1]

    def eval_clients(self, fed: Any) -> list[int]:
        return list(self.plan(fed).clients)

    def eval_sample(self, ids: list[int]) -> list[int] | None:
        return eval_sample(self.cfg, ids)

    def track_rounds(self, algorithm: Algorithm, trainer: Any, prep: Prepared, run: RunDir,
                     start_round: int) -> Algorithm:
        fed = getattr(self, "_fed", None)
        if not self.cfg.eval.every or fed is None:
            return algorithm
        return _EveryKRounds(algorithm, trainer, fed, self.plan(fed), run, start_round)  # type: ignore[return-value]

    def evaluate(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                 finals: dict[int, Message], states: dict[int, State],
                 contexts: dict[int, ClientContext], progress: Any) -> Evaluation:
        plan = self.plan(fed)
        view = plan_view(fed, plan)
        if plan.sampled:
            n_eval = sum(len(view.test_by_task[t]) for ts in plan.tasks.values() for t in ts)
        else:
            n_eval = sum(len(v) for v in fed.test_by_task.values()) * (len(fed.clients) if self.cfg.eval.ttp else 1)
        sample = f" (a seeded sample of {len(plan.clients)} of {plan.n_clients})" if plan.sampled else ""
        say(self.cfg.engine.progress,
            f"[{label(self.cfg.name, self.cfg.seed)}] evaluate: {n_eval} test instances on "
            f"{len(view.clients)} clients{sample}")
        etask = progress.add_task("evaluate", total=n_eval) if progress else None
        results = evaluate_text(
            algorithm, trainer, view, finals, states, contexts, self.cfg.eval.ttp,
            progress=(lambda n: progress.advance(etask, n)) if etask is not None else None,
            dedupe=self.cfg.eval.dedupe, cross_client=self.cfg.eval.cross_client_batch,
            tasks_for=plan.tasks if plan.sampled else None,
        )
        if etask is not None:
            progress.remove_task(etask)
        return Evaluation(
            per_client=results,
            times={"eval_instances": n_eval, "generated_instances": sum(ev.generated for ev in results.values())},
            extra={"references": test_references(view), "plan": plan},
        )

    def evaluate_on_node(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                         ctx: ClientContext, final: Message, state: State) -> dict[str, str]:
        # every node builds the same federation, so each makes the plan the in-process engine
        # makes, and is scored on its tasks in it (a sampled plan: the pooled set among them)
        plan = self.plan(fed)
        view = plan_view(fed, plan)
        ev = evaluate_client(algorithm, trainer, view, ctx, final, state, self.cfg.eval.ttp,
                             tasks=plan.tasks[ctx.cid] if plan.sampled else None)
        references = {t: [e.output for e in view.test_by_task[t]] for t in ev.predictions}
        return {"eval": json.dumps(asdict(ev)), "references": json.dumps(references),
                "plan": json.dumps(plan.facts())}

    def collect(self, replies: dict[int, dict[str, str]], desc: dict[str, Any]) -> Evaluation:
        results = {cid: ClientEval(**json.loads(r["eval"])) for cid, r in sorted(replies.items())}
        references: dict[str, list[str]] = {}
        for r in replies.values():
            references.update(json.loads(r["references"]))
        # the plan as the nodes made it (each the same): its sizes, from the tasks each was scored on
        plan = (EvalPlan.from_replies(desc["data"]["clients"], json.loads(next(iter(replies.values()))["plan"]),
                                      {c: list(ev.scores) for c, ev in results.items()}) if replies else None)
        # nodes never share generations: every client generates for each of its instances
        n_eval = sum(len(p) for ev in results.values() for p in ev.predictions.values())
        return Evaluation(per_client=results,
                          times={"eval_instances": n_eval, "generated_instances": n_eval},
                          extra={"references": references, "plan": plan})

    def summarize(self, run: RunDir, algorithm: Algorithm, trainer: Any, ev: Evaluation,
                  comm: dict[str, int], times: dict[str, Any], desc: dict[str, Any],
                  exported: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        write_eval_records(run, ev.extra["references"], ev.per_client)
        return build_summary(self.cfg, algorithm, ev.per_client, run, comm, trainer,
                             {**times, **ev.times}, desc["data"], exported, extra, plan=ev.extra.get("plan"))


def test_references(fed: Any) -> dict[str, list[str]]:
    return {t: [e.output for e in v] for t, v in fed.test_by_task.items()}


def build_summary(
    cfg: Any, algorithm: Algorithm, results: dict[int, ClientEval], run: RunDir,
    comm: dict[str, int], trainer: Any, times: dict[str, Any], data: dict[str, Any],
    exported: dict[str, Any], extra: dict[str, Any] | None = None, plan: EvalPlan | None = None,
) -> dict[str, Any]:
    """The summary.json of a text run, whichever engine ran it. ``comm`` holds bytes_up and
    bytes_down; ``times`` wall_s, load_s, train_s, finish_s, eval_s, eval_instances and generated_instances;
    per-round seconds come from metrics.jsonl. ``plan``: the evaluation's (None: every client
    scored exactly, as the Flower engine does)."""
    scores = summarize(results, cfg.eval.metric, plan)
    if plan is not None and plan.sampled:
        data = {**data, **{k: _compact(data[k]) for k in ("train_examples", "test_examples") if k in data}}
    weights = [w for ev in results.values() for ws in ev.weights.values() for w in ws]
    n_eval = max(1, times.get("eval_instances") or 1)
    return {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "rounds": cfg.train.rounds,
        "seed": cfg.seed,
        "metric": cfg.eval.metric,
        **algorithm.summary_fields(),
        **scores,
        "comm": {
            "bytes_up": comm["bytes_up"],
            "bytes_down": comm["bytes_down"],
            "shared_roles": list(algorithm.shared_roles),
            "adapter_params": {r: trainer.adapters.num_parameters(r) for r in trainer.adapters.roles},
        },
        "time": {
            **times,
            "per_round_s": [r["seconds"] for r in run.rounds()],
            "eval_s_per_instance": times["eval_s"] / n_eval,
        },
        "memory": {"peak_rss_mb": peak_rss_mb(), "backbone_bytes": backbone_bytes(trainer.model)},
        "data": data,
        "adapters": exported,
        "instance_weights": _weight_stats(results) if weights else None,
        "resumed_at_round": None,
        "evaluated_from": None,
        "privacy": last_privacy(run.rounds()),  # client-level DP; None when off
        "evaluation": evaluation_record(scores["clients"], plan, cfg.seed),
        "p_per_round": json.loads((run.path / ROUND_P).read_text()) if (run.path / ROUND_P).is_file() else None,
        **(extra or {}),
    }


def evaluation_record(clients: dict[str, Any], plan: EvalPlan | None, seed: int) -> dict[str, Any]:
    """summary.json's ``evaluation``: the sample sizes, the distribution of per-client P and
    TTP, and for a sampled evaluation each mean's 95% interval over the sampled clients."""
    rec = plan.record() if plan is not None else {"mode": "exact", "clients": len(clients),
                                                   "clients_evaluated": len(clients)}
    ps = [c["P"] for c in clients.values()]
    ttps = [c["TTP"] for c in clients.values()]
    rec["distribution"] = {"P": distribution(ps), "TTP": distribution(ttps)}
    if plan is not None and plan.sampled and ps:
        rec["interval"] = "95% percentile bootstrap over the evaluated clients"
        rec["P"] = cluster_bootstrap(ps, seed=seed)
        rec["TTP"] = cluster_bootstrap(ttps, seed=seed + 1)
    else:
        rec["interval"] = None  # every client scored: no sampling error (instance-level: fedblend compare)
    return rec


def _compact(per: dict[str, int]) -> dict[str, Any]:
    """A per-client (or per-task) count as its total and spread (too many to list)."""
    v = sorted(per.values())
    return {"n": len(v), "total": sum(v), "min": v[0], "median": v[len(v) // 2], "max": v[-1]} if v else {}


def _weight_stats(results: dict[int, ClientEval]) -> dict[str, Any]:
    own = [w for ev in results.values() for t, ws in ev.weights.items() if t == ev.task for w in ws]
    other = [w for ev in results.values() for t, ws in ev.weights.items() if t != ev.task for w in ws]

    def stats(v: list[float]) -> dict[str, float] | None:
        return {"n": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)} if v else None

    return {"own_task": stats(own), "other_tasks": stats(other)}


def write_eval_records(run: RunDir, references: dict[str, list[str]], results: dict[int, ClientEval]) -> None:
    """eval/predictions.jsonl: one line per (client, test instance)."""
    lines = []
    for cid, ev in results.items():
        for task, preds in ev.predictions.items():
            weights = ev.weights.get(task)
            for i, (ref, pred) in enumerate(zip(references[task], preds, strict=True)):
                rec = {"client": cid, "task": task, "own_task": task == ev.task, "index": i,
                       "prediction": pred, "reference": ref}
                if weights is not None:
                    rec["weight"] = weights[i]
                lines.append(json.dumps(rec))
    (run.path / "eval").mkdir(exist_ok=True)
    (run.path / "eval" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
