"""Balanced CIFAR-10 benchmark of the shipped vision configs against centralized references.

Setting (issue 9): balanced CIFAR-10, Dirichlet(0.1) label skew, 10 clients, the offline
EfficientNet-Lite0 backbone (frozen, 64 px). The shipped ``configs/cifar10/{fedclip,
tripleplay,zeroshot_or_linear_probe,local}.toml`` run unchanged except for the data
(``imbalance_factor = 1``: balanced; ``--n-max`` training images per class) and the test set
size. Reference rows (``accuracy.reference`` of the runs): a centralized linear probe and the
centralized adapter, both on the pooled training features of all clients; each federated row
reports its ratio to the probe. Also measures the backbone's feature-extraction speed at
64 px and 224 px (images/s, on ``--speed-images`` test images).

    PYTHONPATH=src python benchmarks/cifar10_balanced.py [--n-max 500] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from fedblend.config import load_config
from fedblend.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
CONFIGS = ROOT / "configs" / "cifar10"

RUNS = {
    "fedclip (shipped config)": ("fedclip.toml", []),
    "tripleplay (shipped config)": ("tripleplay.toml", []),
    "fedavg linear probe": ("zeroshot_or_linear_probe.toml", []),
    "local adapter": ("local.toml", []),
}


def extraction_speed(size: int, n: int) -> float:
    """Images per second through decode + resize + EfficientNet-Lite0 at ``size`` px."""
    from fedblend.config import config_from_dict
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.cache import compute_features
    from fedblend.vision.parquet import read_image_table

    examples = read_image_table(DATA / "test.parquet").examples[:n]
    cfg = config_from_dict({"algorithm": "fedclip", "vision": {"image_size": size}})
    bb = load_backbone(cfg.vision, [], 0)
    t = time.perf_counter()
    compute_features(bb.encode, examples, size, bb.extra["mean"], bb.extra["std"], 64)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-max", type=int, default=500, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--cache-dir", default="", help="feature cache (default: OUT/cache)")
    ap.add_argument("--speed-images", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cifar10_balanced"))
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--runs", default=",".join(f.removesuffix(".toml") for f, _ in RUNS.values()),
                    help="comma-separated config names to run (fedclip first: it holds the references)")
    ap.add_argument("--reuse", action="store_true", help="read a finished run's summary.json instead of rerunning")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: CIFAR-10 parquet not found")
    out = Path(args.out)
    cache = args.cache_dir or str(out / "cache")
    common = [f"vision.dir='{DATA}'", f"vision.cache_dir='{cache}'", "vision.imbalance_factor=1",
              f"vision.n_max={args.n_max}", f"vision.test_per_class={args.test_per_class}",
              "engine.progress=false", "engine.threads=1", "engine.checkpoint_every=0", *args.set]
    t_all, load = time.perf_counter(), os.getloadavg()
    rows, ref, first = [], None, None
    wanted = args.runs.split(",")
    for label, (file, extra) in RUNS.items():
        if file.removesuffix(".toml") not in wanted:
            continue
        d = out / "runs" / file.removesuffix(".toml")
        if args.reuse and (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
        else:
            shutil.rmtree(d, ignore_errors=True)
            # the reference rows depend on the data and the adapter config only: computed once
            no_ref = [] if label.startswith("fedclip") else ["vision.reference=false"]
            s = run_experiment(load_config(CONFIGS / file, common + extra + no_ref), d)
        first = first or s
        a = s["accuracy"]
        if label.startswith("fedclip"):
            ref = a["reference"]
            ref_s = s["time"]["reference_s"]
        rows.append((label, s["algorithm"], a["overall"], a["tail"], a["own"], s["time"]["mean_round_s"],
                     s["comm"]["bytes_per_round"]))
        print(f"done {label}: overall {a['overall']:.4f} ({s['time']['wall_s']:.0f}s)", flush=True)
    assert ref is not None and first is not None
    probe = ref["linear_probe"]
    speed = {size: extraction_speed(size, args.speed_images) for size in (64, 224)}
    cfg0 = load_config(CONFIGS / "fedclip.toml")
    tr, v = cfg0.train, cfg0.vision
    lines = [
        (f"# Balanced CIFAR-10 (Dirichlet 0.1, 10 clients), EfficientNet-Lite0 frozen, {v.image_size} px, "
         f"{args.n_max} train images per class ({10 * args.n_max} in all), "
         f"{args.test_per_class * 10} global test images, seed 0"),
        "",
        (f"Shipped fedclip config: adapter {v.adapter}, head {v.head} (train_head {v.train_head}), "
         f"feature_norm {v.feature_norm}, balanced_loss {v.balanced_loss}, lr {tr.lr}, batch "
         f"{tr.batch_size}, {tr.rounds} rounds x {tr.local_epochs} local epochs, server_momentum "
         f"{tr.server_momentum}. Timings on a shared 2-core CPU loaded by other jobs (1-minute load "
         f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end): read them as upper "
         "bounds. 'tail' = the 3 classes with the fewest training images (all equal here, so classes 7-9)."),
        "",
        "| method | algorithm | overall acc | tail acc | own-split acc | ratio to linear probe | s/round | bytes/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[2] / probe:.3f} | "
                     f"{r[5]:.2f} | {r[6]:,.0f} |")
    g = ref["groups"]
    lines += [
        (f"| reference: centralized linear probe (L2 {ref['probe_l2']:g}) | - | {probe:.4f} | "
        f"{g['linear_probe']['tail']:.4f} | - | 1.000 | - | - |"),
        (f"| reference: centralized adapter ({ref['adapter_epochs']} epochs) | - | "
        f"{ref['centralized_adapter']:.4f} | {g['centralized_adapter']['tail']:.4f} | - | "
        f"{ref['centralized_adapter'] / probe:.3f} | - | - |"),
        "",
        "| cost | value |",
        "|---|---|",
        (f"| feature extraction 64 px ({args.speed_images} test images, decode + resize + backbone) | "
        f"{speed[64]:.1f} images/s |"),
        f"| feature extraction 224 px ({args.speed_images} test images) | {speed[224]:.1f} images/s |",
        (f"| feature extraction time of the first run ({'cache hits' if first['time']['feature_cache']['misses'] == 0 else 'cold'}) | "
        f"{first['time']['feature_s']:.0f} s |"),
        (f"| reference rows' cost (probe, adapter) | {ref_s['linear_probe']:.1f} s, "
        f"{ref_s['centralized_adapter']:.1f} s |"),
        f"| benchmark wall time | {time.perf_counter() - t_all:.0f} s |",
        "",
        f"torch threads: {torch.get_num_threads()}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (out.parent / "cifar10_balanced.md").write_text(text)


if __name__ == "__main__":
    main()
