"""FedDPA benchmark on flan8 with SmolLM2-135M: local, fedit, feddpa_f, feddpa_t.

All methods run on the same federation and seed (the shipped configs in configs/flan8 plus
the scale below). FedDPA-T is trained once and evaluated under four inference weightings
(dynamic/intent, dynamic/official, static 0.5, global-only) from the states its clients hold
after training (``fedblend evaluate``), so the weightings differ only at inference. The
global-only evaluation (every client generating, no sharing of identical models) is the
plain single-adapter inference that dynamic weighting's cost is compared with (same model,
same test set, same number of generations).

Scale (chosen to finish in about 30 minutes on 2 idle CPU cores; one SmolLM2 step on 8
flan8 examples takes 6-10 s there): 8 clients x 8 training examples, 2 rounds x 2 local
epochs (batch 8, so 2 steps per phase, lr 2e-3), FedDPA-F fine-tunes 2 epochs, 3 test
examples per task (TTP: 8 x 24 generations per personalised method), at most 10 new tokens.
At this scale differences of a few ROUGE points are within noise. Pass --full-scale for the
shipped configs' own scale.

    python benchmarks/flan8_feddpa.py --out runs/bench_feddpa
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALE = [
    "data.max_train_per_client=8", "train.rounds=2", "train.local_epochs=2", "train.batch_size=8",
    "train.lr=2e-3", "feddpa.finetune_epochs=2", "eval.max_per_task=3", "eval.max_new_tokens=10",
    "engine.progress=false",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_feddpa"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flan8"))
    ap.add_argument("--full-scale", action="store_true", help="use the shipped configs' scale")
    args = ap.parse_args()

    from fedblend.compare import load_configs, run_compare, write_compare_report
    from fedblend.runner import evaluate_run
    from fedblend.store.rundir import RunDir

    overrides = ([] if args.full_scale else SCALE) + [f"data.dir={args.data}"]
    configs = [ROOT / "configs" / "flan8" / f"{a}.toml" for a in ("local", "fedit", "feddpa_f", "feddpa_t")]
    t0 = time.perf_counter()
    result = run_compare(load_configs(configs, overrides), args.out, resume=True)
    dpa_t = next(r for r in result["runs"] if r["algorithm"] == "feddpa_t")
    variants = {
        "feddpa_t[dynamic,official]": ["feddpa.weighting_convention=official"],
        "feddpa_t[static 0.5]": ["feddpa.weighting=static", "feddpa.static_weight=0.5"],
        # every client holds the same final G: without dedupe=false it would be generated once
        # and shared, and the cost comparison would not be on the same number of generations
        "feddpa_t[global only]": ["feddpa.weighting=global", "eval.dedupe=false"],
    }
    from fedblend.compare import _row

    for label, sets in variants.items():
        out = args.out / label.replace(" ", "_")
        summary = RunDir(out).summary() if RunDir(out).complete else evaluate_run(
            dpa_t["run_dir"], sets + ["engine.progress=false"], out
        )
        result["runs"].append(_row(label, summary, out))
    by = {r["label"]: r for r in result["runs"]}
    dyn, plain = by["feddpa_t[dynamic,intent]"], by["feddpa_t[global only]"]
    assert dyn["generated"] == plain["generated"], (dyn["generated"], plain["generated"])
    result["dynamic_inference_cost_ratio"] = dyn["eval_s"] / plain["eval_s"]
    result["benchmark_wall_s"] = time.perf_counter() - t0
    result["scale"] = "full (shipped configs)" if args.full_scale else SCALE
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    write_compare_report(args.out, result)

    print(f"{'method':30s} {'mean P':>8s} {'mean TTP':>9s} {'bytes up':>10s} {'train s':>8s} {'eval s':>8s}")
    for r in result["runs"]:
        print(f"{r['label']:30s} {r['P']:8.4f} {r['TTP']:9.4f} {r['bytes_up']:10d} "
              f"{(r['train_s'] or 0):8.1f} {r['eval_s']:8.1f}")
    print(f"metric: mean {result['runs'][0]['metric']} over 8 clients; same federation and seed")
    print(f"dynamic-weighting inference cost / plain single-adapter inference (same test set): "
          f"{result['dynamic_inference_cost_ratio']:.2f}x")
    print(f"benchmark wall time: {result['benchmark_wall_s']:.0f} s; report: {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
