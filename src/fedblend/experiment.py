"""Run one experiment end to end on the in-process engine and write its run directory."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import ClientContext, client_seed
from fedblend.config import VISION_ALGORITHMS, ExperimentConfig
from fedblend.engines.inprocess import Tap, Transport, run_rounds
from fedblend.reports.rundir import RunDir


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def progress_bars(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=True,
    ) as p:
        yield p


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, resume: bool = False, tap: Tap | None = None
) -> dict[str, Any]:
    """Run ``cfg`` and return its summary; a failed run leaves no summary.json."""
    if cfg.algorithm in VISION_ALGORITHMS:
        from fedblend.vision.experiment import run_vision_experiment

        return run_vision_experiment(cfg, out, resume=resume, tap=tap)
    run = RunDir(out)
    start_round = run.start(cfg.to_dict(), resume)
    try:
        summary = _run_text(cfg, run, start_round, tap)
    except BaseException as e:
        run.fail(e)
        raise
    return summary


def _run_text(cfg: ExperimentConfig, run: RunDir, start_round: int, tap: Tap | None) -> dict[str, Any]:
    from fedblend.backbones.text import load_text_backbone
    from fedblend.data.federation import build_federation
    from fedblend.eval.protocol import evaluate_text
    from fedblend.trainers.text import TextTrainer

    t0 = time.perf_counter()
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.seed)
    fed = build_federation(cfg)
    algorithm = make_algorithm(cfg)
    t_load = time.perf_counter()
    backbone, tok = load_text_backbone(cfg.model, cfg.seed)
    trainer = TextTrainer(cfg, backbone, tok)
    load_s = time.perf_counter() - t_load
    if algorithm.pools_data:
        train_data = {0: [e for c in fed.clients for e in c.train]}
    else:
        train_data = {c.cid: c.train for c in fed.clients}
    transport = Transport(tap=tap)
    counters: dict[str, Any] = {"train_s": 0.0}
    if start_round > 0:
        server_state, client_states, counters = run.load_checkpoint(list(train_data))
        transport.bytes_up, transport.bytes_down = counters["bytes_up"], counters["bytes_down"]
    else:
        server_state = algorithm.init_server_state(trainer)
        client_states = {cid: algorithm.init_client_state(trainer, cid) for cid in train_data}

    with progress_bars(cfg.engine.progress) as progress:
        loop = run_rounds(
            algorithm, trainer, train_data, cfg, run, transport, server_state, client_states,
            start_round=start_round, progress=progress, counters=counters,
        )
        # the final global model goes to every client, which may then finish locally
        t_fin = time.perf_counter()
        final = algorithm.final_payload(loop.server_state)
        rounds = cfg.train.rounds
        states = {c.cid: loop.client_states.get(c.cid, {}) for c in fed.clients}
        contexts: dict[int, ClientContext] = {}
        finals = {}
        for c in fed.clients:
            finals[c.cid] = transport.down(rounds, c.cid, final)
            contexts[c.cid] = ClientContext(
                cid=c.cid, round=rounds, seed=client_seed(cfg.seed, rounds, c.cid),
                examples=c.train, trainer=trainer, cfg=cfg,
            )
            steps = algorithm.finish_steps(len(c.train), trainer)
            task = progress.add_task(f"finish client {c.cid}", total=steps) if progress and steps else None
            if task is not None:
                contexts[c.cid].progress = lambda n, t=task: progress.advance(t, n)
            states[c.cid] = algorithm.finish_client(contexts[c.cid], finals[c.cid], states[c.cid])
            contexts[c.cid].progress = None
            if task is not None:
                progress.remove_task(task)
        finish_s = time.perf_counter() - t_fin

        t_eval = time.perf_counter()
        n_eval = sum(len(v) for v in fed.test_by_task.values()) * (
            len(fed.clients) if cfg.eval.ttp else 1
        )
        etask = progress.add_task("evaluate", total=n_eval) if progress else None
        results = evaluate_text(
            algorithm, trainer, fed, finals, states, contexts, cfg.eval.ttp,
            progress=(lambda n: progress.advance(etask, n)) if etask is not None else None,
        )
        eval_s = time.perf_counter() - t_eval

    exported = _export_adapters(algorithm, trainer, run, finals, states)
    write_eval_records(run, test_references(fed), results)
    times = {
        "wall_s": time.perf_counter() - t0,
        "load_s": load_s,
        "train_s": loop.train_s,
        "finish_s": finish_s,
        "eval_s": eval_s,
        "eval_instances": n_eval,
    }
    summary = build_summary(
        cfg, algorithm, results, run, transport, trainer, times, data_info(fed), exported, start_round
    )
    complete_run(run, summary)
    return summary


def data_info(fed) -> dict[str, Any]:
    return {
        "clients": len(fed.clients),
        "train_examples": {str(c.cid): len(c.train) for c in fed.clients},
        "test_examples": {t: len(v) for t, v in fed.test_by_task.items()},
    }


def test_references(fed) -> dict[str, list[str]]:
    return {t: [e.output for e in v] for t, v in fed.test_by_task.items()}


def build_summary(
    cfg: ExperimentConfig,
    algorithm,
    results,
    run: RunDir,
    transport: Transport,
    trainer,
    times: dict[str, Any],
    data: dict[str, Any],
    exported: dict[str, Any],
    start_round: int,
) -> dict[str, Any]:
    """The summary.json of a text run, whichever engine ran it. ``times`` holds wall_s, load_s,
    train_s, finish_s, eval_s and eval_instances; per-round seconds come from metrics.jsonl."""
    from fedblend.eval.protocol import summarize

    scores = summarize(results, cfg.eval.metric)
    per_round = [r["seconds"] for r in run.rounds()]
    return {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "rounds": cfg.train.rounds,
        "seed": cfg.seed,
        "metric": cfg.eval.metric,
        **scores,
        "comm": {
            "bytes_up": transport.bytes_up,
            "bytes_down": transport.bytes_down,
            "shared_roles": list(algorithm.shared_roles),
            "adapter_params": {r: trainer.adapters.num_parameters(r) for r in trainer.adapters.roles},
        },
        "time": {
            "wall_s": times["wall_s"],
            "load_s": times["load_s"],
            "train_s": times["train_s"],
            "per_round_s": per_round,
            "finish_s": times["finish_s"],
            "eval_s": times["eval_s"],
            "eval_instances": times["eval_instances"],
        },
        "memory": {"peak_rss_mb": peak_rss_mb()},
        "data": data,
        "adapters": exported,
        "resumed_at_round": start_round or None,
    }


def complete_run(run: RunDir, summary: dict[str, Any]) -> None:
    """Write summary.json (which marks the run complete) and report.html."""
    from fedblend.reports.html import write_report

    run.write_summary(summary)
    write_report(run.path)


def _export_adapters(algorithm, trainer, run: RunDir, finals, states) -> dict[str, Any]:
    out: dict[str, Any] = {"local": {}}
    global_done = False
    for cid, state in states.items():
        adapters = algorithm.eval_adapters(finals[cid], state)
        for role, tensors in adapters.items():
            if role == "global" and not global_done:
                trainer.adapters.export("global", tensors, run.path / "adapters" / "global")
                out["global"] = "adapters/global"
                global_done = True
            elif role == "local":
                rel = f"adapters/local/client_{cid}"
                trainer.adapters.export("local", tensors, run.path / rel)
                out["local"][str(cid)] = rel
    return out


def write_eval_records(run: RunDir, references: dict[str, list[str]], results) -> None:
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
