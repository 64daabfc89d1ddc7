"""Run one vision experiment on the in-process engine (the vision twin of ``_run_text``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import ClientContext, client_seed
from fedblend.config import ExperimentConfig
from fedblend.engines.inprocess import Tap, run_rounds
from fedblend.reports.rundir import RunDir


def run_vision_experiment(
    cfg: ExperimentConfig, out: str | Path, resume: bool = False, tap: Tap | None = None
) -> dict[str, Any]:
    """Run ``cfg`` (a vision algorithm) and return its summary; a failed run leaves none."""
    run = RunDir(out)
    start_round = run.start(cfg.to_dict(), resume)
    try:
        return _run(cfg, run, start_round, tap)
    except BaseException as e:
        run.fail(e)
        raise


def effective_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """zeroshot and linear_probe have no adapter; linear_probe trains a linear head."""
    if cfg.algorithm == "zeroshot":
        return cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"adapter": "none", "head": "text"})})
    if cfg.algorithm == "linear_probe":
        return cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"adapter": "none", "head": "linear"})})
    return cfg


class _PerRoundEval:
    """Wraps an algorithm: after each aggregation, scores the new global adapter on the global
    test set (cheap on cached features), for accuracy per round and rounds-to-target."""

    FILE = "eval/accuracy_per_round.json"

    def __init__(self, algorithm, trainer, shard, enabled: bool, run: RunDir, start_round: int) -> None:
        self._a, self._tr, self._shard, self.enabled, self._run = algorithm, trainer, shard, enabled, run
        saved = run.path / self.FILE
        # a resumed run keeps the rounds it already scored
        self.history: list[float] = json.loads(saved.read_text())[:start_round] if saved.is_file() else []

    def __getattr__(self, name: str):
        return getattr(self._a, name)

    def aggregate(self, rnd, updates, server_state):
        new = self._a.aggregate(rnd, updates, server_state)
        if self.enabled and "global" in new:
            pred = self._tr.predict({"global": 1.0}, {"global": new["global"]}, self._shard)
            self.history.append(float((pred == self._shard.labels).float().mean()))
            self._run.write_json(self.FILE, self.history)
        return new


def _progress(progress, name: str, total: int):
    if progress is None:
        return None, None
    task = progress.add_task(name, total=total)
    return task, (lambda n: progress.advance(task, n))


def _accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[int] | None = None) -> float | None:
    mask = torch.ones_like(y, dtype=torch.bool) if classes is None else torch.isin(y, torch.tensor(classes))
    if not bool(mask.any()):
        return None
    return float((pred[mask] == y[mask]).float().mean())


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _run(cfg: ExperimentConfig, run: RunDir, start_round: int, tap: Tap | None) -> dict[str, Any]:
    from fedblend.experiment import initial_states, peak_rss_mb, prepare_torch, progress_bars
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.federation import build_image_federation
    from fedblend.vision.trainer import VisionTrainer

    t0 = prepare_torch(cfg)
    cfg = effective_config(cfg)
    fed = build_image_federation(cfg)
    algorithm = make_algorithm(cfg)
    t_load = time.perf_counter()
    backbone = load_backbone(cfg.vision, fed.class_names, cfg.seed)
    trainer = VisionTrainer(cfg, backbone, len(fed.class_names))
    load_s = time.perf_counter() - t_load

    with progress_bars(cfg.engine.progress) as progress:
        t_feat = time.perf_counter()
        n_all = sum(len(c.train) + len(c.test) for c in fed.clients) + len(fed.global_test) + len(fed.unseen_test)
        task, adv = _progress(progress, "features" if trainer.use_cache else "preprocess", n_all)
        train_data = {c.cid: trainer.shard(c.train, adv) for c in fed.clients}
        own_tests = {c.cid: trainer.shard(c.test, adv) for c in fed.clients}
        global_test = trainer.shard(fed.global_test, adv)
        unseen = trainer.shard(fed.unseen_test, adv) if fed.unseen_test else None
        if task is not None:
            progress.remove_task(task)
        feature_s = time.perf_counter() - t_feat

        transport, counters, server_state, client_states = initial_states(
            algorithm, trainer, run, list(train_data), start_round, tap
        )
        tracked = _PerRoundEval(algorithm, trainer, global_test, trainer.use_cache, run, start_round)
        loop = run_rounds(
            tracked, trainer, train_data, cfg, run, transport, server_state, client_states,
            start_round=start_round, progress=progress, counters=counters,
        )
        rounds = cfg.train.rounds
        final = algorithm.final_payload(loop.server_state)
        t_eval = time.perf_counter()
        groups = fed.class_groups()
        per_client: dict[str, Any] = {}
        memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        records: dict[int, torch.Tensor] = {}
        for c in fed.clients:
            fin = transport.down(rounds, c.cid, final)
            state = loop.client_states.get(c.cid, {})
            ctx = ClientContext(cid=c.cid, round=rounds, seed=client_seed(cfg.seed, rounds, c.cid),
                                examples=train_data[c.cid], trainer=trainer, cfg=cfg)
            state = algorithm.finish_client(ctx, fin, state)
            adapters = algorithm.eval_adapters(fin, state)
            mix = algorithm.eval_mix_weights()
            key = json.dumps(sorted((r, float(sum(t.double().sum() for t in adapters[r].values()))) for r in adapters))
            if key not in memo:
                memo[key] = (trainer.predict(mix, adapters, global_test),
                             trainer.predict(mix, adapters, unseen) if unseen is not None else None)
            g_pred, u_pred = memo[key]
            own_pred = trainer.predict(mix, adapters, own_tests[c.cid])
            records[c.cid] = g_pred
            per_client[str(c.cid)] = {
                "domain": c.domain,
                "train_examples": len(c.train),
                "own": _accuracy(own_pred, own_tests[c.cid].labels),
                "global": _accuracy(g_pred, global_test.labels),
                "head": _accuracy(g_pred, global_test.labels, groups["head"]),
                "medium": _accuracy(g_pred, global_test.labels, groups["medium"]),
                "tail": _accuracy(g_pred, global_test.labels, groups["tail"]),
                "unseen_domain": _accuracy(u_pred, unseen.labels) if unseen is not None and u_pred is not None else None,
                "per_class": [_accuracy(g_pred, global_test.labels, [k]) for k in range(len(fed.class_names))],
            }
        eval_s = time.perf_counter() - t_eval

    write_vision_records(run, global_test.labels, records)
    pc = list(per_client.values())
    n_cls = len(fed.class_names)
    accuracy = {
        "overall": _mean([p["global"] for p in pc]),
        "own": _mean([p["own"] for p in pc]),
        "head": _mean([p["head"] for p in pc]),
        "medium": _mean([p["medium"] for p in pc]),
        "tail": _mean([p["tail"] for p in pc]),
        "unseen_domain": _mean([p["unseen_domain"] for p in pc]),
        "per_client": per_client,
    }
    history = tracked.history
    target = cfg.vision.target_accuracy
    to_target = next((i + 1 for i, a in enumerate(history) if a >= target), None)
    logged = run.rounds()
    per_round = [r["seconds"] for r in logged]
    exported: dict[str, Any] = {}
    if "global" in final.tensors:
        trainer.adapters.export("global", final.tensors["global"], run.path / "adapters" / "global")
        exported["global"] = "adapters/global"
    summary: dict[str, Any] = {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "rounds": rounds,
        "seed": cfg.seed,
        "metric": "accuracy",
        "accuracy": accuracy,
        "class_names": fed.class_names,
        "per_class_accuracy": [_mean([p["per_class"][k] for p in pc]) for k in range(n_cls)],
        "class_groups": fed.class_groups(),
        "accuracy_per_round": history,
        "rounds_to_target": {"target": target, "rounds": to_target},
        "comm": {
            "bytes_up": transport.bytes_up,
            "bytes_down": transport.bytes_down,
            # training rounds only (the final broadcast is in bytes_down, not here)
            "bytes_per_round": _mean([r["bytes_up"] + r["bytes_down"] for r in logged]) or 0,
            "shared_roles": list(algorithm.shared_roles),
            "adapter_params": {r: trainer.adapters.num_parameters(r) for r in trainer.adapters.roles},
        },
        "time": {
            "wall_s": time.perf_counter() - t0,
            "load_s": load_s,
            "feature_s": feature_s,
            "train_s": loop.train_s,
            "per_round_s": per_round,
            "mean_round_s": sum(per_round) / len(per_round) if per_round else None,
            "eval_s": eval_s,
            "feature_cache": {"used": trainer.use_cache, "hits": trainer.cache.hits, "misses": trainer.cache.misses},
        },
        "memory": {"peak_rss_mb": peak_rss_mb(), "backbone_bytes": backbone.backbone_bytes,
                   "nf4": cfg.vision.nf4},
        "data": {
            "clients": len(fed.clients),
            "train_examples": {str(c.cid): len(c.train) for c in fed.clients},
            "train_class_counts": fed.train_counts,
            "global_test": len(fed.global_test),
            "unseen_test": len(fed.unseen_test),
        },
        "adapters": exported,
        "resumed_at_round": start_round or None,
    }
    run.write_summary(summary)
    from fedblend.reports.html import write_report

    write_report(run.path)
    return summary


def write_vision_records(run: RunDir, labels: torch.Tensor, preds: dict[int, torch.Tensor]) -> None:
    """eval/predictions.jsonl: one line per (client, global test instance), so comparisons can
    bootstrap accuracy over instances."""
    y = labels.tolist()
    lines = [
        json.dumps({"client": cid, "split": "global", "index": i, "label": y[i], "prediction": int(p)})
        for cid, pred in preds.items() for i, p in enumerate(pred.tolist())
    ]
    (run.path / "eval").mkdir(exist_ok=True)
    (run.path / "eval" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
