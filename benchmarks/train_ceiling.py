"""How close can one LoRA training step come to the matmul peak on this machine? (issue 12)

Runs real ``TextTrainer.train`` steps at the bench's quick scale (flan8 + SmolLM2, batch 16 /
micro-batch 8, LoRA r 8 on q_proj/v_proj with dropout 0.05, FedIT's mix), each under the torch
profiler with FLOP counting, a matmul-peak burst (:class:`fedblend.bench.flops.RateProbe`) before
each step. Splits every step's wall time into matrix products (``aten::mm``/``bmm``/``addmm``)
and everything else, and prints per step and in total:

- efficiency = useful FLOPs (the bench's convention) / (wall x the peak measured beside it);
- the products' share of the step and their rate as a fraction of that peak;
- the *ceiling*: the efficiency the step would have if every product ran at exactly the peak
  and nothing else changed, useful / ((product FLOPs / peak + other seconds) x peak);
- the largest non-product operators.

    python benchmarks/train_ceiling.py [--steps-per-client 2] [--threads 2] [--out FILE.json]

The profiler adds a little time of its own to each operator, so wall times here run slightly
above an unprofiled step's; the shares and the ceiling are what this script is for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fedblend.bench.core import bench_config
from fedblend.bench.flops import RateProbe, linear_counts, train_flops
from fedblend.bench.text import client_tokens
from fedblend.modalities import modality_for
from fedblend.runlog import third_party_to

PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "flan8")
    ap.add_argument("--steps-per-client", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = Path(tempfile.gettempdir()) / "train_ceiling.log"
    with third_party_to(log):
        cfg = bench_config("fedit", "quick", args.data)
        mod = modality_for(cfg)
        cfg = mod.cfg
        fed = mod.build_federation()
        trainer = mod.load_trainer(mod.describe(fed))
        counts = linear_counts(trainer.model)
        probe = RateProbe()
        probe.start("steps")
        trainer.train(("client", 0), fed.clients[0].train, ["global"], {"global": 1.0, "local": 0.0}, 1.0, 0)  # warm-up
        rows = []
        other: dict[str, float] = defaultdict(float)
        for rep in range(args.steps_per_client):
            for client in fed.clients:
                ex = client.train
                data = trainer.tokenize(("client", client.cid), ex)
                tok, resp = client_tokens(trainer, client.cid, ex)  # means per example
                drawn = trainer.train_steps(len(data), 1.0) * min(cfg.train.batch_size, len(data))
                useful = train_flops(counts, drawn * tok, drawn * resp)  # as fedblend bench counts
                lens = sorted(len(i) for i, _ in data)  # one length-grouped batch when n <= batch
                micro = cfg.train.micro_batch_size
                slots = sum(len(c) * max(c) for c in (lens[j:j + micro] for j in range(0, len(lens), micro)))
                peak = probe.sample()
                with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                    t = time.perf_counter()
                    trainer.train(("client", client.cid), ex, ["global"], {"global": 1.0, "local": 0.0}, 1.0, rep + 1)
                    wall = time.perf_counter() - t
                mm_s = mm_flops = 0.0
                for e in prof.key_averages():
                    if e.key in PRODUCTS:
                        mm_s += e.self_cpu_time_total / 1e6
                        mm_flops += e.flops or 0
                    elif e.self_cpu_time_total > 0:
                        other[e.key] += e.self_cpu_time_total / 1e6
                rest = max(0.0, wall - mm_s)
                rows.append({
                    "client": client.cid, "rep": rep, "wall_s": wall, "peak_gflops": peak,
                    "efficiency": useful / (wall * peak * 1e9), "products_share": mm_s / wall,
                    "products_vs_peak": mm_flops / mm_s / 1e9 / peak if mm_s else None,
                    "ceiling": useful / ((mm_flops / (peak * 1e9) + rest) * peak * 1e9),
                    "useful_gflop": useful / 1e9, "product_gflop": mm_flops / 1e9,
                    "padding_share": 1 - sum(lens) / slots if len(data) <= cfg.train.batch_size else None,
                })
                r = rows[-1]
                print(f"client {client.cid} rep {rep}: {wall:.2f} s, peak {peak:.0f} GFLOP/s, efficiency "
                      f"{r['efficiency']:.2f}, products {r['products_share']:.0%} of the step at "
                      f"{r['products_vs_peak']:.2f} of the peak, ceiling {r['ceiling']:.2f}", flush=True)
    total = sum(r["wall_s"] for r in rows)
    top = sorted(other.items(), key=lambda kv: -kv[1])[:8]
    summary = {k: {"mean": statistics.mean(r[k] for r in rows), "sd": statistics.stdev(r[k] for r in rows)}
               for k in ("efficiency", "products_share", "products_vs_peak", "ceiling", "peak_gflops")}
    print()
    print("| measure | mean | sd (over steps) |")
    print("|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['mean']:.3f} | {v['sd']:.3f} |")
    print()
    print("largest non-product operators (share of all steps' wall time):",
          ", ".join(f"{k} {s / total:.1%}" for k, s in top))
    print(f"{len(rows)} steps, {args.threads} threads; third-party log {log}")
    if args.out:
        args.out.write_text(json.dumps({"steps": rows, "summary": summary,
                                        "other_ops_share": {k: s / total for k, s in top}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
