"""The vision modality: image federations, a frozen (CLIP) backbone with feature adapters,
accuracy on each client's own test split and on the global (and unseen-domain) test set."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig
from fedblend.modality import Evaluation, Modality, Prepared, peak_rss_mb
from fedblend.store.rundir import RunDir
from fedblend.trust import last_privacy

ROUND_ACCURACY = "eval/accuracy_per_round.json"


def effective_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The vision settings the algorithm fixes (its ``vision_overrides``: zeroshot and
    linear_probe have no adapter; linear_probe trains a linear head)."""
    from fedblend.algorithms import algorithm_class

    fixed = getattr(algorithm_class(cfg.algorithm), "vision_overrides", {})
    if not fixed:
        return cfg
    return cfg.model_copy(update={"vision": cfg.vision.model_copy(update=fixed)})


class _PerRoundEval:
    """Wraps an algorithm: after each aggregation, scores the new global adapter on the global
    test set (cheap on cached features), for accuracy per round and rounds-to-target."""

    FILE = ROUND_ACCURACY

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


@dataclass
class TestShards:
    own: dict[int, Any]
    global_test: Any
    unseen: Any | None


def _accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[int] | None = None) -> float | None:
    mask = torch.ones_like(y, dtype=torch.bool) if classes is None else torch.isin(y, torch.tensor(classes))
    if not bool(mask.any()):
        return None
    return float((pred[mask] == y[mask]).float().mean())


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


class VisionModality(Modality):
    name = "vision"
    export_local = False
    carried_files = (ROUND_ACCURACY,)

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(effective_config(cfg))

    def build_federation(self) -> Any:
        from fedblend.vision.federation import build_image_federation

        return build_image_federation(self.cfg)

    def describe(self, fed: Any) -> dict[str, Any]:
        return {
            "class_names": fed.class_names,
            "class_groups": fed.class_groups(),
            "data": {
                "clients": len(fed.clients),
                "train_examples": {str(c.cid): len(c.train) for c in fed.clients},
                "train_class_counts": fed.train_counts,
                "global_test": len(fed.global_test),
                "unseen_test": len(fed.unseen_test),
            },
        }

    def load_trainer(self, desc: dict[str, Any]) -> Any:
        from fedblend.vision.backbones import load_backbone, on_device
        from fedblend.vision.trainer import VisionTrainer

        backbone = load_backbone(self.cfg.vision, desc["class_names"], self.cfg.seed)
        backbone = on_device(backbone, self.device, self.cfg.model.dtype)
        return VisionTrainer(self.cfg, backbone, len(desc["class_names"]))

    def prepare(self, trainer: Any, fed: Any, algorithm: Algorithm, progress: Any,
                cids: Sequence[int] | None = None, evaluation: bool = True) -> Prepared:
        import time

        clients = [c for c in fed.clients if cids is None or c.cid in cids]
        t = time.perf_counter()
        n_all = sum(len(c.train) + len(c.test) * evaluation for c in clients)
        n_all += (len(fed.global_test) + len(fed.unseen_test)) * evaluation
        task = progress.add_task("features" if trainer.use_cache else "preprocess", total=n_all) if progress else None
        adv = (lambda n: progress.advance(task, n)) if task is not None else None
        train_data = {c.cid: trainer.shard(c.train, adv) for c in clients}
        tests = None
        if evaluation:
            tests = TestShards(own={c.cid: trainer.shard(c.test, adv) for c in clients},
                               global_test=trainer.shard(fed.global_test, adv),
                               unseen=trainer.shard(fed.unseen_test, adv) if fed.unseen_test else None)
        if task is not None:
            progress.remove_task(task)
        return Prepared(train_data=train_data, examples=train_data,
                        times={"feature_s": time.perf_counter() - t}, extra=tests)

    def track_rounds(self, algorithm: Algorithm, trainer: Any, prep: Prepared, run: RunDir,
                     start_round: int) -> Algorithm:
        return _PerRoundEval(algorithm, trainer, prep.extra.global_test, trainer.use_cache, run,  # type: ignore[return-value]
                             start_round)

    def node_config(self, raw: dict[str, Any], node_root: Path) -> dict[str, Any]:
        if raw.get("vision", {}).get("cache_dir"):  # each SuperNode keeps its own feature cache
            raw["vision"]["cache_dir"] = str(node_root / "feature_cache")
        return raw

    # ---- evaluation -----------------------------------------------------------------------
    @staticmethod
    def _memo_key(algorithm: Algorithm, final: Message, state: State) -> str:
        """Clients whose eval adapters are the same share one prediction of the global test set."""
        adapters = algorithm.eval_adapters(final, state)
        return json.dumps(sorted((r, float(sum(t.double().sum() for t in adapters[r].values()))) for r in adapters))

    def client_record(self, algorithm: Algorithm, trainer: Any, fed: Any, shards: TestShards, cid: int,
                      final: Message, state: State, memo: dict[str, Any]) -> dict[str, Any]:
        """One client's accuracies: its own test split, the global test set (overall, by class
        group, per class) and the unseen domain."""
        client = self.client(fed, cid)
        adapters = algorithm.eval_adapters(final, state)
        mix = algorithm.eval_mix_weights()
        g, u = shards.global_test, shards.unseen
        key = self._memo_key(algorithm, final, state)
        if key not in memo:
            memo[key] = (trainer.predict(mix, adapters, g),
                         trainer.predict(mix, adapters, u) if u is not None else None)
        g_pred, u_pred = memo[key]
        own_pred = trainer.predict(mix, adapters, shards.own[cid])
        groups = fed.class_groups()
        return {
            "domain": client.domain,
            "train_examples": len(client.train),
            "own": _accuracy(own_pred, shards.own[cid].labels),
            "global": _accuracy(g_pred, g.labels),
            "head": _accuracy(g_pred, g.labels, groups["head"]),
            "medium": _accuracy(g_pred, g.labels, groups["medium"]),
            "tail": _accuracy(g_pred, g.labels, groups["tail"]),
            "unseen_domain": _accuracy(u_pred, u.labels) if u is not None and u_pred is not None else None,
            "per_class": [_accuracy(g_pred, g.labels, [k]) for k in range(len(fed.class_names))],
        }

    def evaluate(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                 finals: dict[int, Message], states: dict[int, State],
                 contexts: dict[int, ClientContext], progress: Any) -> Evaluation:
        memo: dict[str, Any] = {}
        per_client = {c.cid: self.client_record(algorithm, trainer, fed, prep.extra, c.cid, finals[c.cid],
                                                states[c.cid], memo) for c in fed.clients}
        # eval/predictions.jsonl: every client's prediction per global test instance, so
        # comparisons can bootstrap accuracy over instances (fedblend.evidence)
        records = {c.cid: memo[self._memo_key(algorithm, finals[c.cid], states[c.cid])][0]
                   for c in fed.clients}
        from fedblend.vision.reference import reference_accuracies

        # centralized reference rows on the same frozen features (in-process only: a deployment
        # never pools the clients' data, so on Flower accuracy.reference is null)
        reference = reference_accuracies(self.cfg, trainer, list(prep.train_data.values()),
                                         prep.extra.global_test, fed.class_groups())
        times = self._cache_times(trainer)
        if reference is not None:  # seconds are timing, not accuracy: summary.time.reference_s
            times["reference_s"] = reference.pop("seconds")
        return Evaluation(per_client=per_client, times=times,
                          extra={"reference": reference, "records": (prep.extra.global_test.labels, records)})

    def _cache_times(self, trainer: Any) -> dict[str, Any]:
        return {"feature_cache": {"used": trainer.use_cache, "hits": trainer.cache.hits,
                                  "misses": trainer.cache.misses}}

    def evaluate_on_node(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                         ctx: ClientContext, final: Message, state: State) -> dict[str, str]:
        rec = self.client_record(algorithm, trainer, fed, prep.extra, ctx.cid, final, state, {})
        return {"eval": json.dumps(rec), "cache": json.dumps(self._cache_times(trainer)["feature_cache"])}

    def collect(self, replies: dict[int, dict[str, str]], desc: dict[str, Any]) -> Evaluation:
        caches = [json.loads(r["cache"]) for r in replies.values()]
        cache = {"used": all(c["used"] for c in caches), "hits": sum(c["hits"] for c in caches),
                 "misses": sum(c["misses"] for c in caches)}
        return Evaluation(per_client={cid: json.loads(r["eval"]) for cid, r in sorted(replies.items())},
                          times={"feature_cache": cache})

    def export_adapters(self, algorithm: Algorithm, trainer: Any, run: RunDir,
                        finals: dict[int, Message], states: dict[int, State]) -> dict[str, Any]:
        final = next(iter(finals.values()), Message())
        if "global" not in final.tensors:
            return {}
        trainer.adapters.export("global", final.tensors["global"], run.path / "adapters" / "global")
        return {"global": "adapters/global"}

    def summarize(self, run: RunDir, algorithm: Algorithm, trainer: Any, ev: Evaluation,
                  comm: dict[str, int], times: dict[str, Any], desc: dict[str, Any],
                  exported: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        per_client = {str(cid): rec for cid, rec in ev.per_client.items()}
        pc = list(per_client.values())
        n_cls = len(desc["class_names"])
        accuracy = {k: _mean([p[src] for p in pc]) for k, src in (
            ("overall", "global"), ("own", "own"), ("head", "head"), ("medium", "medium"),
            ("tail", "tail"), ("unseen_domain", "unseen_domain"))}
        accuracy["per_client"] = per_client
        accuracy["reference"] = (ev.extra or {}).get("reference")
        if (ev.extra or {}).get("records"):  # in-process only: nodes send scores, not predictions
            write_vision_records(run.path, *ev.extra["records"])
        saved = run.path / ROUND_ACCURACY
        history = json.loads(saved.read_text()) if saved.is_file() else []
        target = cfg.vision.target_accuracy
        to_target = next((i + 1 for i, a in enumerate(history) if a >= target), None)
        logged = run.rounds()
        per_round = [r["seconds"] for r in logged]
        return {
            "name": cfg.name,
            "algorithm": cfg.algorithm,
            "rounds": cfg.train.rounds,
            "seed": cfg.seed,
            "metric": "accuracy",
            "accuracy": accuracy,
            "class_names": desc["class_names"],
            "per_class_accuracy": [_mean([p["per_class"][k] for p in pc]) for k in range(n_cls)],
            "class_groups": desc["class_groups"],
            "accuracy_per_round": history,
            "rounds_to_target": {"target": target, "rounds": to_target},
            "comm": {
                "bytes_up": comm["bytes_up"],
                "bytes_down": comm["bytes_down"],
                # training rounds only (the final broadcast is in bytes_down, not here)
                "bytes_per_round": _mean([r["bytes_up"] + r["bytes_down"] for r in logged]) or 0,
                "shared_roles": list(algorithm.shared_roles),
                "adapter_params": {r: trainer.adapters.num_parameters(r) for r in trainer.adapters.roles},
            },
            "time": {
                **times,
                **ev.times,
                "per_round_s": per_round,
                "mean_round_s": sum(per_round) / len(per_round) if per_round else None,
            },
            "memory": {"peak_rss_mb": peak_rss_mb(), "backbone_bytes": trainer.backbone.backbone_bytes,
                       "nf4": cfg.vision.nf4},
            "data": desc["data"],
            "adapters": exported,
            "resumed_at_round": None,
            "privacy": last_privacy(logged),  # client-level DP; None when off
            **extra,
        }


def write_vision_records(run_dir: Path, labels: torch.Tensor, preds: dict[int, torch.Tensor]) -> None:
    """eval/predictions.jsonl: one line per (client, global test instance)."""
    y = labels.tolist()
    lines = [
        json.dumps({"client": cid, "split": "global", "index": i, "label": y[i], "prediction": int(p)})
        for cid, pred in preds.items() for i, p in enumerate(pred.tolist())
    ]
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
