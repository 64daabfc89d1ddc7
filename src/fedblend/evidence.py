"""Per-instance scores from run records, arranged for :mod:`fedblend.stats`.

Text runs: ``eval/predictions.jsonl`` holds each client's prediction and reference per test
instance; each is scored with the run's primary metric (:func:`fedblend.text.metrics.score_one`),
so the means reproduce ``summary.json``. Vision runs: the same file holds each client's
prediction and label on the shared balanced test set.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from fedblend.errors import FedblendError
from fedblend.stats import Strata, bootstrap, paired


def _records(run_dir: Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "eval" / "predictions.jsonl"
    if not p.is_file():
        raise FedblendError(f"{p}: no per-instance records (re-run to get intervals)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def text_strata(run_dir: Path, metric: str) -> dict[str, Strata]:
    """Metric name -> strata: ``P``, ``TTP`` and ``P[client k]`` for every client."""
    from fedblend.text.metrics import score_one

    by: dict[tuple[int, str], list[tuple[int, float, bool]]] = defaultdict(list)
    for r in _records(run_dir):
        s = score_one(r["prediction"], r["reference"])[metric]
        by[(r["client"], r["task"])].append((r["index"], s, r["own_task"]))
    cells = {k: np.array([s for _, s, _ in sorted(v)]) for k, v in by.items()}
    own = {cid: task for (cid, task), v in by.items() if v[0][2]}
    out: dict[str, Strata] = {
        "P": {str(cid): (task, cells[(cid, task)]) for cid, task in sorted(own.items())},
    }
    out["TTP"] = {f"{cid}/{task}": (task, x) for (cid, task), x in sorted(cells.items())}
    for cid, task in sorted(own.items()):
        out[f"P[client {cid}]"] = {str(cid): (task, cells[(cid, task)])}
    return out


def vision_strata(run_dir: Path, summary: dict[str, Any]) -> dict[str, Strata]:
    """``accuracy`` (overall, balanced test set) and ``tail accuracy``, mean over clients."""
    by: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for r in _records(run_dir):
        by[r["client"]].append((r["index"], r["label"], r["prediction"]))
    tail = set(summary.get("class_groups", {}).get("tail", []))
    out: dict[str, Strata] = {"accuracy": {}, "tail accuracy": {}}
    for cid, rows in sorted(by.items()):
        rows.sort()
        y = np.array([lab for _, lab, _ in rows])
        correct = (np.array([p for _, _, p in rows]) == y).astype(float)
        out["accuracy"][str(cid)] = ("global", correct)
        mask = np.isin(y, list(tail))
        if mask.any():
            out["tail accuracy"][str(cid)] = ("global_tail", correct[mask])
    if not out["tail accuracy"]:
        del out["tail accuracy"]
    return out


def run_strata(run_dir: Path) -> dict[str, Strata]:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if "accuracy" in summary:
        return vision_strata(run_dir, summary)
    return text_strata(run_dir, summary["metric"])


def method_stats(strata_by_seed: list[dict[str, Strata]]) -> dict[str, Any]:
    """Metric -> bootstrap summary over the seeds of one method."""
    metrics = [m for m in strata_by_seed[0] if all(m in s for s in strata_by_seed)]
    return {m: bootstrap([s[m] for s in strata_by_seed]) for m in metrics}


def compare_stats(methods: dict[str, list[dict[str, Strata]]]) -> dict[str, Any]:
    """Per method and metric the interval; per pair of methods and shared headline metric
    (those without ``[``) the paired difference."""
    out: dict[str, Any] = {
        "interval": "95% percentile bootstrap over seeds, then test instances within each seed",
        "plus_minus": "half-width of the 95% interval",
        "methods": {label: method_stats(s) for label, s in methods.items()},
        "pairs": [],
    }
    for a, b in combinations(methods, 2):
        sa, sb = methods[a], methods[b]
        for m in sa[0]:
            if "[" in m or not all(m in s for s in sa + sb):
                continue
            try:
                d = paired([s[m] for s in sa], [s[m] for s in sb])
            except FedblendError:
                continue  # scored on different instances (e.g. another federation): no pairing
            out["pairs"].append({"a": a, "b": b, "metric": m, "diff": d})
    return out
