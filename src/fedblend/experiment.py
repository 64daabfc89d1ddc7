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
from fedblend.reports.rundir import RunDir, save_state


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


def prepare_torch(cfg: ExperimentConfig) -> float:
    """Thread count and global seed for a run; returns the start time."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.seed)
    return time.perf_counter()


def initial_states(algorithm, trainer, run: RunDir, client_ids: list[int], start_round: int, tap: Tap | None):
    """Fresh server and client states, or those of the last checkpoint when resuming, with a
    transport whose byte counters continue from the checkpoint."""
    transport = Transport(tap=tap)
    if start_round > 0:
        server_state, client_states, counters = run.load_checkpoint(client_ids)
        transport.bytes_up, transport.bytes_down = counters["bytes_up"], counters["bytes_down"]
    else:
        counters = {"train_s": 0.0}
        server_state = algorithm.init_server_state(trainer)
        client_states = {cid: algorithm.init_client_state(trainer, cid) for cid in client_ids}
    return transport, counters, server_state, client_states


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, resume: bool = False, tap: Tap | None = None
) -> dict[str, Any]:
    """Run ``cfg`` and return its summary; a failed run leaves no summary.json. Third-party
    warnings and logs go to ``out/run.log``, not the terminal."""
    from fedblend.runlog import third_party_to

    with third_party_to(Path(out) / "run.log"):
        return _run_experiment(cfg, out, resume, tap)


def _run_experiment(cfg: ExperimentConfig, out: str | Path, resume: bool, tap: Tap | None) -> dict[str, Any]:
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
    from fedblend.trainers.text import TextTrainer

    t0 = prepare_torch(cfg)
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
    transport, counters, server_state, client_states = initial_states(
        algorithm, trainer, run, list(train_data), start_round, tap
    )

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

    # what each client holds after training: the final payload and its finished private state
    save_state(run.path / "final" / "server.safetensors", final.tensors)
    for cid, st in states.items():
        save_state(run.path / "final" / "clients" / f"{cid}.safetensors", st)
    train_info = {
        "comm": {"bytes_up": transport.bytes_up, "bytes_down": transport.bytes_down},
        "time": {"load_s": load_s, "train_s": loop.train_s, "finish_s": finish_s,
                 "per_round_s": [r["seconds"] for r in run.rounds()]},
        "resumed_at_round": start_round or None,
    }
    return evaluate_and_summarize(cfg, run, fed, algorithm, trainer, finals, states, contexts, train_info, t0)


def evaluate_and_summarize(
    cfg: ExperimentConfig, run: RunDir, fed, algorithm, trainer, finals, states, contexts,
    train_info: dict[str, Any], t0: float,
) -> dict[str, Any]:
    """Evaluate every client where its state is, export adapters, write summary and report."""
    from fedblend.eval.protocol import evaluate_text

    t_eval = time.perf_counter()
    n_eval = sum(len(v) for v in fed.test_by_task.values()) * (len(fed.clients) if cfg.eval.ttp else 1)
    with progress_bars(cfg.engine.progress) as progress:
        etask = progress.add_task("evaluate", total=n_eval) if progress else None
        results = evaluate_text(
            algorithm, trainer, fed, finals, states, contexts, cfg.eval.ttp,
            progress=(lambda n: progress.advance(etask, n)) if etask is not None else None,
            dedupe=cfg.eval.dedupe,
        )
    eval_s = time.perf_counter() - t_eval
    exported = _export_adapters(algorithm, trainer, run, finals, states)
    write_eval_records(run, test_references(fed), results)
    times = {"wall_s": time.perf_counter() - t0, **train_info["time"], "eval_s": eval_s,
             "eval_instances": n_eval, "generated_instances": sum(ev.generated for ev in results.values())}
    extra = {k: train_info.get(k) for k in ("resumed_at_round", "evaluated_from")}
    summary = build_summary(
        cfg, algorithm, results, run, train_info["comm"], trainer, times, data_info(fed), exported, extra
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
    comm: dict[str, int],
    trainer,
    times: dict[str, Any],
    data: dict[str, Any],
    exported: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json of a text run, whichever engine ran it. ``comm`` holds bytes_up and
    bytes_down; ``times`` wall_s, load_s, train_s, finish_s, eval_s, eval_instances and generated_instances;
    per-round seconds come from metrics.jsonl."""
    from fedblend.eval.protocol import summarize

    scores = summarize(results, cfg.eval.metric)
    weights = [w for ev in results.values() for ws in ev.weights.values() for w in ws]
    n_eval = max(1, times.get("eval_instances") or 1)
    return {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "rounds": cfg.train.rounds,
        "seed": cfg.seed,
        "metric": cfg.eval.metric,
        "weighting": {"mode": cfg.eval.weighting, "convention": cfg.eval.weighting_convention}
        if cfg.algorithm.startswith("feddpa") else None,
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
        "memory": {"peak_rss_mb": peak_rss_mb()},
        "data": data,
        "adapters": exported,
        "instance_weights": _weight_stats(results) if weights else None,
        "resumed_at_round": None,
        "evaluated_from": None,
        **(extra or {}),
    }


def complete_run(run: RunDir, summary: dict[str, Any]) -> None:
    """Write summary.json (which marks the run complete) and report.html."""
    from fedblend.reports.html import write_report

    run.write_summary(summary)
    write_report(run.path)


def _weight_stats(results) -> dict[str, Any]:
    own = [w for ev in results.values() for t, ws in ev.weights.items() if t == ev.task for w in ws]
    other = [w for ev in results.values() for t, ws in ev.weights.items() if t != ev.task for w in ws]

    def stats(v):
        return {"n": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)} if v else None

    return {"own_task": stats(own), "other_tasks": stats(other)}


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


def evaluate_run(source: str | Path, overrides: list[str], out: str | Path) -> dict[str, Any]:
    """Re-evaluate a completed text run with other ``eval.*`` settings (e.g. FedDPA weightings)
    from the states its clients held after training; writes a new run directory."""
    from fedblend.runlog import third_party_to

    with third_party_to(Path(out) / "run.log"):
        return _evaluate_run(source, overrides, out)


def _evaluate_run(source: str | Path, overrides: list[str], out: str | Path) -> dict[str, Any]:
    from fedblend.backbones.text import load_text_backbone
    from fedblend.comm.codec import Message
    from fedblend.config import config_from_dict
    from fedblend.data.federation import build_federation
    from fedblend.errors import ConfigError, FedblendError
    from fedblend.reports.rundir import load_state
    from fedblend.trainers.text import TextTrainer

    src = RunDir(source)
    if not src.complete or not (src.path / "final" / "server.safetensors").is_file():
        raise FedblendError(f"{src.path}: not a completed text run with final states")
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "engine."))]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only eval.* and engine.* can change when re-evaluating")
    cfg = config_from_dict(src.config(), overrides, source=str(src.path / "config.json"))
    run = RunDir(out)
    run.start(cfg.to_dict(), resume=False)
    try:
        t0 = time.perf_counter()
        (run.path / "metrics.jsonl").write_text((src.path / "metrics.jsonl").read_text())
        fed = build_federation(cfg)
        algorithm = make_algorithm(cfg)
        backbone, tok = load_text_backbone(cfg.model, cfg.seed)
        trainer = TextTrainer(cfg, backbone, tok)
        final = Message(tensors=load_state(src.path / "final" / "server.safetensors"))
        states, finals, contexts = {}, {}, {}
        for c in fed.clients:
            p = src.path / "final" / "clients" / f"{c.cid}.safetensors"
            states[c.cid] = load_state(p) if p.is_file() else {}
            finals[c.cid] = final
            contexts[c.cid] = ClientContext(
                cid=c.cid, round=cfg.train.rounds, seed=client_seed(cfg.seed, cfg.train.rounds, c.cid),
                examples=c.train, trainer=trainer, cfg=cfg,
            )
        old = src.summary()
        keep = ("load_s", "train_s", "finish_s", "per_round_s")
        train_info = {
            "comm": {k: old["comm"][k] for k in ("bytes_up", "bytes_down")},
            "time": {k: old["time"][k] for k in keep if k in old["time"]},
            "evaluated_from": str(src.path),
        }
        return evaluate_and_summarize(cfg, run, fed, algorithm, trainer, finals, states, contexts, train_info, t0)
    except BaseException as e:
        run.fail(e)
        raise
