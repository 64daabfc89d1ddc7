"""Does a larger ``eval.batch_size`` make the cross-client batched TTP faster? (issue 12)

At `fedblend bench --quick` scale (flan8 clients 0-3, 4 test examples per task, 16 new tokens,
FedDPA-T with dynamic weights, 2 torch threads) a FedDPA-T session is trained once, then TTP is
evaluated client after client and cross-client batched at each batch size, ``--reps`` times,
alternating. Prints one JSON line per evaluation: seconds, evaluation efficiency against the
matmul peak measured at the start, ``generate`` calls and generated tokens.

    python benchmarks/eval_batch_size.py --sizes 16,64 --reps 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flan8")
    ap.add_argument("--sizes", default="16,64", help="eval.batch_size values, comma-separated")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "eval_batch_size.log")
    args = ap.parse_args()

    from fedblend.bench.core import bench_config
    from fedblend.bench.flops import efficiency, matmul_peak
    from fedblend.bench.text import evaluate_timed, train_session
    from fedblend.runlog import third_party_to
    from fedblend.text.metrics import score

    torch.set_num_threads(args.threads)
    with third_party_to(args.log):
        peak = float(matmul_peak(2048)["gflops"])
        s = train_session(bench_config("feddpa_t", "quick", args.data), Path(tempfile.mkdtemp()) / "feddpa_t")
        score(["warm up"], ["warm up"])  # the scorer's one-time imports
        for _ in range(args.reps):
            for bs in (int(x) for x in args.sizes.split(",")):
                s.cfg.eval.batch_size = bs
                for cross in (False, True):
                    r = evaluate_timed(s, ttp=True, cross_client_batch=cross)
                    print(json.dumps({
                        "batch_size": bs, "cross_client_batch": cross, "seconds": round(r["seconds"], 1),
                        "eval_efficiency": round(efficiency(r["flops"], r["seconds"], peak) or 0, 3),
                        "generate_calls": r["generate_calls"], "generated_tokens": r["generated_tokens"],
                    }), flush=True)
    print(json.dumps({"peak_gflops": round(peak, 1), "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
