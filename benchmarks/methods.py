"""Every text method on flan8 at `fedblend reproduce feddpa`'s quick settings, plus the
heterogeneous-rank methods (FLoRA, FlexLoRA, HetLoRA) with ranks [16, 8, 8, 4] over the same
4 clients: P and TTP with 95% intervals, bytes per round and seconds per round.

The quick settings (src/fedblend/resources/reproduce.toml, budget "quick"): SmolLM2-135M, the
demo's 4 short-answer clients (0, 1, 2, 7), 16 training examples each, 2 rounds x 1.5 epochs
at batch 8 and lr 2e-3, 8 test examples per task, at most 8 new tokens. At this size a few
ROUGE points are within noise: read the intervals.

    python benchmarks/methods.py --seeds 3 --out runs/methods     # every method, 3 seeds
    python benchmarks/methods.py --seeds 1 --methods fedit,flora  # a subset

Writes OUT/methods.json and prints the markdown table (benchmarks/results/methods.md holds
the last one). A method this build does not register is skipped and named.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedblend import algorithms
from fedblend.compare import run_compare, seed_list
from fedblend.evidence import method_stats, run_strata
from fedblend.reproduce import budget_configs
from fedblend.store.rundir import RunDir

HETERO = ("flora", "flexlora", "hetlora")
RANKS = [16, 8, 8, 4]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def per_round(dirs: list[Path]) -> dict[str, float]:
    """Means over seeds of bytes up / down per round (all clients) and seconds per round
    (the server's round time from metrics.jsonl, training and aggregation included)."""
    ups, downs, secs = [], [], []
    for d in dirs:
        s = RunDir(d).summary()
        rounds = s["rounds"]
        ups.append(s["comm"]["bytes_up"] / rounds)
        downs.append(s["comm"]["bytes_down"] / rounds)
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rs = [x["seconds"] for x in lines if "seconds" in x]
        secs.append(sum(rs) / len(rs) if rs else s["time"]["train_s"] / rounds)
    n = len(dirs)
    return {"bytes_up": sum(ups) / n, "bytes_down": sum(downs) / n, "round_s": sum(secs) / n,
            "round_s_min": min(secs), "round_s_max": max(secs)}


def fmt_ci(st: dict[str, Any]) -> str:
    return f"{st['mean']:.3f} [{st['lo']:.3f}, {st['hi']:.3f}]"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| method | ranks | P [95% CI] | TTP [95% CI] | KB up / round | KB down / round | s / round (min-max) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['ranks']} | {fmt_ci(r['P'])} | {fmt_ci(r['TTP'])} | "
                   f"{r['bytes_up'] / 1e3:,.1f} | {r['bytes_down'] / 1e3:,.1f} | "
                   f"{r['round_s']:.1f} ({r['round_s_min']:.1f}-{r['round_s_max']:.1f}) |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/methods"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated labels (default: every registered one)")
    ap.add_argument("--no-hetero", action="store_true", help="skip the ranks [16, 8, 8, 4] rows")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="extra --set overrides")
    args = ap.parse_args()

    want = [m for m in args.methods.split(",") if m]
    configs = budget_configs("feddpa", "quick", ["engine.progress=false", *args.overrides])
    skipped = [m for m in want if m not in configs and m not in HETERO]
    plan = {k: c for k, c in configs.items() if not want or k in want}
    if not args.no_hetero:
        for m in HETERO:
            if (not want or m in want) and m in algorithms.names():
                base = next(iter(configs.values()))
                plan[f"{m} r{RANKS}"] = base.model_validate(
                    {**base.to_dict(), "algorithm": m,
                     "lora": {**base.to_dict()["lora"], "client_ranks": RANKS, "r": max(RANKS)}})
    seeds = seed_list(next(iter(configs.values())).seed, args.seeds)
    print(f"methods on flan8 (quick): {', '.join(plan)} x {len(seeds)} seed(s); CPU: {cpu_name()}", flush=True)
    t0 = time.perf_counter()
    result = run_compare(list(plan.values()), args.out / "runs", resume=True, seeds=seeds, labels=list(plan))
    rows = []
    for r in result["runs"]:
        dirs = [Path(d) for d in r["run_dirs"]]
        st = method_stats([run_strata(d) for d in dirs])
        cfg = plan[r["label"]]
        ranks = str(cfg.lora.client_ranks) if cfg.lora.client_ranks else f"{cfg.lora.r}"
        rows.append({"label": r["label"], "ranks": ranks, "P": st["P"], "TTP": st["TTP"], **per_round(dirs)})
    doc = {"cpu": cpu_name(), "seeds": seeds, "wall_s": time.perf_counter() - t0, "rows": rows,
           "skipped": skipped, "interval": "95% percentile bootstrap over seeds, then test instances within each seed",
           "settings": "reproduce feddpa --budget quick", "python": sys.version.split()[0]}
    (args.out / "methods.json").write_text(json.dumps(doc, indent=2))
    print(table(rows))
    if skipped:
        print(f"not in this build: {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
