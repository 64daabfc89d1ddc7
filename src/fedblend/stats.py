"""Uncertainty for every number a comparison prints: bootstrap 95% intervals over seeds and
test instances, and paired differences between methods.

A metric (mean P, mean TTP, one client's P, vision accuracy) is a mean over *strata* of the
mean of per-instance scores in each stratum: P over clients (each on its own task's test
instances), TTP over (client, task) pairs, vision accuracy over clients on the shared test
set. Each stratum belongs to a *group* of test instances (the task, or the shared vision test
set); strata of one group see the same instances, so a bootstrap replicate draws one resample
of indices per group and seed and applies it to every stratum of the group.

The bootstrap is hierarchical: resample the seeds (with replacement), then, within each drawn
seed, the test instances of every group. With one seed only the instances are resampled. The
point estimate is the mean over seeds of the metric on the sample as measured; the interval is
the 2.5 and 97.5 percentiles of the replicates, and ``half`` (what a table prints after ``±``)
is half its width.

A paired difference between two methods is the same statistic of the per-instance score
differences (the metric is linear in the instance scores), paired by seed and instance, so
methods that agree on every instance differ by exactly 0 with a zero-width interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedblend.errors import FedblendError

# one seed's data: stratum key -> (group key, per-instance scores)
Strata = Mapping[str, tuple[str, np.ndarray]]

N_BOOT = 2000
LEVEL = 0.95


def _stat(strata: Strata, idx: Mapping[str, np.ndarray] | None) -> np.ndarray | float:
    """Mean over strata of the stratum means; with ``idx`` (group -> (B, n) indices), one
    value per replicate."""
    vals = []
    for group, scores in strata.values():
        if idx is None:
            vals.append(float(np.mean(scores)))
        else:
            vals.append(scores[idx[group]].mean(axis=1))
    return float(np.mean(vals)) if idx is None else np.mean(np.stack(vals), axis=0)


def _group_sizes(strata: Strata) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for key, (group, scores) in strata.items():
        if len(scores) == 0:
            raise FedblendError(f"stratum {key!r} has no test instances")
        if sizes.setdefault(group, len(scores)) != len(scores):
            raise FedblendError(f"group {group!r}: strata differ in instance count")
    return sizes


def bootstrap(
    per_seed: Sequence[Strata], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict[str, Any]:
    """Mean, sd over seeds, and a percentile bootstrap interval of the metric defined by
    ``per_seed`` (one :data:`Strata` per seed)."""
    if not per_seed:
        raise FedblendError("no seeds to summarise")
    rng = np.random.default_rng(seed)
    sizes = [_group_sizes(s) for s in per_seed]
    point = [float(_stat(s, None)) for s in per_seed]
    n = len(per_seed)
    # position j of a replicate's seed draw gets its own instance resample, so a seed drawn
    # twice in one replicate is not resampled identically
    draws = rng.integers(0, n, size=(n_boot, n)) if n > 1 else np.zeros((n_boot, 1), dtype=int)
    reps = np.zeros(n_boot)
    for j in range(draws.shape[1]):
        per = np.stack([
            _stat(s, {g: rng.integers(0, m, size=(n_boot, m)) for g, m in sz.items()})
            for s, sz in zip(per_seed, sizes, strict=True)
        ])  # (n_seeds, n_boot)
        reps += per[draws[:, j], np.arange(n_boot)]
    reps /= draws.shape[1]
    alpha = (1 - level) / 2
    lo, hi = (float(v) for v in np.quantile(reps, [alpha, 1 - alpha]))
    mean = float(np.mean(point))
    return {
        "mean": mean,
        "sd": float(np.std(point, ddof=1)) if n > 1 else None,
        "lo": lo,
        "hi": hi,
        "half": (hi - lo) / 2,
        "seeds": n,
        "instances": int(sum(sum(sz.values()) for sz in sizes)),
        "per_seed": point,
    }


def paired(
    a: Sequence[Strata], b: Sequence[Strata], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict[str, Any]:
    """The paired difference a - b (same seeds, same strata, same instances) with its interval
    and ``significant`` (the interval excludes 0)."""
    if len(a) != len(b):
        raise FedblendError(f"paired difference: {len(a)} seeds vs {len(b)}")
    diffs = []
    for sa, sb in zip(a, b, strict=True):
        if set(sa) != set(sb):
            raise FedblendError("paired difference: the methods were scored on different strata")
        d = {}
        for k, (g, x) in sa.items():
            gb, y = sb[k]
            if g != gb or len(x) != len(y):
                raise FedblendError(f"paired difference: stratum {k!r} differs between methods")
            d[k] = (g, np.asarray(x, dtype=float) - np.asarray(y, dtype=float))
        diffs.append(d)
    out = bootstrap(diffs, n_boot=n_boot, seed=seed, level=level)
    out["significant"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def fmt(s: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.555 ± 0.031`` (± = half-width of the 95% interval)."""
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['half']:.{digits}f}"


def cluster_bootstrap(
    values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict[str, Any]:
    """The mean of per-client values from a random sample of clients, with the percentile
    bootstrap interval over clients (resampled with replacement). Each client's value already
    averages its own test instances, so resampling clients carries both the spread between
    clients and the instance noise within them (the cluster bootstrap). The interval treats the
    sample as drawn from a large population: conservative when it is most of the federation."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise FedblendError("no clients to summarise")
    rng = np.random.default_rng(seed)
    reps = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = (float(v) for v in np.quantile(reps, [alpha, 1 - alpha]))
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "half": (hi - lo) / 2, "clients": int(x.size)}


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def distribution(values: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """Quantiles and a histogram on [0, 1] of per-client scores (what a table of thousands of
    rows cannot show)."""
    x = np.asarray(values, dtype=float)
    counts, edges = np.histogram(np.clip(x, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return {
        "n": int(x.size),
        "quantiles": {f"{q:g}": float(np.quantile(x, q)) for q in QUANTILES} if x.size else {},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }
