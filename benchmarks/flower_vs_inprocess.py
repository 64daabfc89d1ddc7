"""One config, two engines, side by side: the in-process engine and a loopback Flower
deployment (SuperLink + one SuperNode per client, started and stopped by
``fedblend deploy local``'s code). Prints end-to-end and per-round seconds, evaluation
seconds, bytes, the ClientApp's backbone load time per message, and how far the two final
global adapters are apart (they should be equal up to float noise).

Default: FedDPA-T on two flan8 clients (cola, wic) with SmolLM2-135M, 2 rounds (round 0 is
FedDPA-T's global-only round, round 1 trains the local then the global adapter), 8 training
examples per client, 1 local epoch, 3 test examples per task.

    python benchmarks/flower_vs_inprocess.py --out runs/bench_flower
    python benchmarks/flower_vs_inprocess.py configs/tiny/fedit.toml --set data.num_clients=2 --no-scale
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALE = [
    "data.clients=[2, 7]", "data.max_train_per_client=8", "train.rounds=2", "train.local_epochs=1",
    "train.batch_size=8", "eval.max_per_task=3", "eval.max_new_tokens=6", "engine.progress=false",
]


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(ta) != set(tb):
        raise SystemExit(f"adapter tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "flan8" / "feddpa_t.toml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override section.key=value")
    ap.add_argument("--no-scale", action="store_true", help="do not apply the default small flan8 scale")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_flower"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flan8"))
    args = ap.parse_args()

    from fedblend.config import load_config
    from fedblend.deploy.local import deploy_local
    from fedblend.runner import run_experiment

    overrides = ([] if args.no_scale else [*SCALE, f"data.dir={args.data}"]) + args.sets
    cfg = load_config(args.config, overrides)
    n_clients = len(cfg.data.clients) if cfg.data.clients else cfg.data.num_clients
    for d in ("inprocess", "flower", ".flower.deploy"):
        shutil.rmtree(args.out / d, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    s_in = run_experiment(cfg, args.out / "inprocess")
    e2e_in = time.perf_counter() - t
    t = time.perf_counter()
    s_fl, _ = deploy_local(args.config, n_clients, overrides, args.out / "flower")
    e2e_fl = time.perf_counter() - t  # includes starting and stopping the SuperLink and SuperNodes

    engine = json.loads((args.out / "flower" / "flower" / "engine.json").read_text())
    diff = max_abs_diff(args.out / "inprocess" / "adapters" / "global", args.out / "flower" / "adapters" / "global")
    rows = {}
    for name, s, e2e in (("in-process", s_in, e2e_in), ("flower deployment", s_fl, e2e_fl)):
        rows[name] = {
            "end_to_end_s": e2e, "per_round_s": s["time"]["per_round_s"], "eval_s": s["time"]["eval_s"],
            "bytes_up": s["comm"]["bytes_up"], "bytes_down": s["comm"]["bytes_down"],
            "mean_P": s["mean"]["P"], "mean_TTP": s["mean"]["TTP"],
        }
    result = {
        "config": str(args.config), "overrides": overrides, "clients": n_clients, "engines": rows,
        "global_adapter_max_abs_diff": diff,
        "flower_backbone_load_s_per_message": engine["backbone_load_s_per_message"],
    }
    (args.out / "flower_vs_inprocess.json").write_text(json.dumps(result, indent=2))

    print(f"{'engine':18s} {'e2e s':>7s} {'per-round s':>16s} {'eval s':>7s} {'bytes up':>10s} "
          f"{'bytes down':>10s} {'P':>6s} {'TTP':>6s}")
    for name, r in rows.items():
        rounds = ", ".join(f"{x:.1f}" for x in r["per_round_s"])
        print(f"{name:18s} {r['end_to_end_s']:7.1f} {rounds:>16s} {r['eval_s']:7.1f} {r['bytes_up']:10d} "
              f"{r['bytes_down']:10d} {r['mean_P']:6.3f} {r['mean_TTP']:6.3f}")
    load = engine["backbone_load_s_per_message"]
    print(f"ClientApp backbone load per message: mean {load['mean']:.2f} s, max {load['max']:.2f} s "
          f"over {load['n']} messages")
    print(f"final global adapter, max |in-process - flower|: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
