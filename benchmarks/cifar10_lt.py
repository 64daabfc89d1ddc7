"""CIFAR-10-LT benchmark of the vision path with the offline EfficientNet-Lite0 backbone.

Setting (issue 3): imbalance factor 100, Dirichlet(0.1) label skew, 10 clients. Training
hyperparameters (rounds, local epochs, lr, batch) and the adapter / head / feature
normalisation come from the shipped ``configs/cifar10/fedclip.toml`` (tuned on balanced
CIFAR-10, see ``cifar10_balanced.py``); the TriplePlay row with LT help takes the shipped
``tripleplay.toml``'s long-tail options. Reference rows: the centralized linear probe and
centralized adapter on the pooled training features (``accuracy.reference``). Downscaled to
finish in well under 30 minutes on a 2-core CPU: the head class keeps ``--n-max`` images
(default 300, so the LT train set has 740), images are resized 32 -> 64 px, the global
balanced test set has 50 images per class, each client's own test split 40. Runs:
local adapter, FedAvg adapter, FedProx, TriplePlay without and with long-tail help
(balanced softmax + federated conditional feature GAN). Also measures seconds per round
with and without the frozen-feature cache (same algorithm, same data, one process) and the
backbone's memory in fp32 vs NF4.

    PYTHONPATH=src python benchmarks/cifar10_lt.py [--rounds N] [--n-max 300] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import tomllib
from pathlib import Path

import torch

from fedblend.algorithms.tripleplay import TriplePlaySettings
from fedblend.config import config_from_dict
from fedblend.engines.inprocess import Transport, run_rounds
from fedblend.runner import run_experiment
from fedblend.store.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
SHIPPED = {k: tomllib.loads((ROOT / "configs" / "cifar10" / f"{k}.toml").read_text())
           for k in ("fedclip", "tripleplay")}
MODEL_KEYS = ("adapter", "adapter_reduction", "adapter_ratio", "head", "logit_scale", "loss", "feature_norm")


def base(args, out: Path) -> dict:
    train = dict(SHIPPED["fedclip"]["train"])
    if args.rounds:
        train["rounds"] = args.rounds
    model = {k: v for k, v in SHIPPED["fedclip"]["vision"].items() if k in MODEL_KEYS}
    return {
        "name": "cifar10-lt", "seed": 0,
        "data": {"num_clients": 10, "partitioner": "dirichlet", "dirichlet_alpha": 0.1},
        "train": train,
        "fedprox": {"mu": 0.01},
        "engine": {"progress": False,  # 1 thread: the 2 cores are shared
                   "threads": 1, "checkpoint_every": 0},
        "vision": {
            "backbone": "efficientnet_lite0", "dir": str(DATA), "image_size": args.size,
            "imbalance_factor": 100, "n_max": args.n_max, "test_per_class": 50,
            "own_test_size": 40, "cache_dir": args.cache_dir or str(out / "cache"),
            "feature_batch_size": 64, "target_accuracy": 0.3, **model,
        },
    }


PLAIN = {"balanced_loss": False, "gan": False}
RUNS = {
    "local adapter": ("local_adapter", PLAIN),
    "fedavg adapter": ("fedavg_adapter", PLAIN),
    "fedprox (mu 0.01)": ("fedprox", PLAIN),
    "tripleplay, no LT help": ("tripleplay", PLAIN),
    "tripleplay + balanced softmax only": ("tripleplay", {"balanced_loss": True, "gan": False}),
    "tripleplay + LT help (shipped tripleplay.toml)": (
        "tripleplay", {"balanced_loss": SHIPPED["tripleplay"]["vision"]["balanced_loss"],
                       **SHIPPED["tripleplay"]["tripleplay"]}),
}


def merge(cfg: dict, algorithm: str, settings: dict) -> dict:
    """``settings``: [vision] keys, and the [tripleplay] section's (gan, steps, ...)."""
    c = json.loads(json.dumps(cfg))
    c["algorithm"] = algorithm
    for k, v in settings.items():
        if k in TriplePlaySettings.model_fields:
            c.setdefault("tripleplay", {})[k] = v
        else:
            c["vision"][k] = v
    return c


def time_round_without_cache(raw: dict, out: Path) -> float:
    """One FedAvg-adapter round with full backbone forward passes (no feature cache)."""
    from fedblend.algorithms import make_algorithm
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.federation import build_image_federation
    from fedblend.vision.trainer import VisionTrainer

    cfg = config_from_dict(merge(raw, "fedavg_adapter", {"cache_dir": ""}), ["train.rounds=1"])
    fed = build_image_federation(cfg)
    trainer = VisionTrainer(cfg, load_backbone(cfg.vision, fed.class_names, cfg.seed), 10)
    data = {c.cid: trainer.shard(c.train) for c in fed.clients}  # pixels, decoded once
    alg = make_algorithm(cfg)
    run = RunDir(out / "nocache")
    shutil.rmtree(run.path, ignore_errors=True)
    run.start(cfg.to_dict(), False)
    state = alg.init_server_state(trainer)
    t = time.perf_counter()
    run_rounds(alg, trainer, data, cfg, run, Transport(), state, {})
    return time.perf_counter() - t


def backbone_memory(raw: dict) -> dict:
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.images import pixels
    from fedblend.vision.parquet import read_image_table

    out = {}
    x = pixels(read_image_table(DATA / "test.parquet").examples[:64], raw["vision"]["image_size"],
               [0.498] * 3, [0.502] * 3)
    feats = {}
    for nf4 in (False, True):
        cfg = config_from_dict(merge(raw, "fedavg_adapter", {"nf4": nf4}))
        bb = load_backbone(cfg.vision, [], 0)
        out["nf4" if nf4 else "fp32"] = bb.backbone_bytes
        with torch.no_grad():
            feats[nf4] = bb.encode(x)
    out["feature_cosine"] = float(torch.nn.functional.cosine_similarity(feats[False], feats[True]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=0, help="0 = the shipped config's")
    ap.add_argument("--n-max", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cifar10_lt"))
    ap.add_argument("--cold", action="store_true", help="delete the feature cache first")
    ap.add_argument("--cache-dir", default="", help="feature cache (default: OUT/cache)")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: CIFAR-10 parquet not found")
    out = Path(args.out)
    if args.cold:
        shutil.rmtree(out / "cache", ignore_errors=True)  # time the feature extraction too
    raw = base(args, out)
    t_all = time.perf_counter()
    rows = []
    ref = None
    for i, (label, (alg, vis)) in enumerate(RUNS.items()):
        d = out / "runs" / f"{i}_{alg}"
        shutil.rmtree(d, ignore_errors=True)
        # reference rows depend on the data and the adapter config only: computed once
        s = run_experiment(config_from_dict(merge(raw, alg, {**vis, "reference": alg == "fedavg_adapter"})), d)
        a, c, t = s["accuracy"], s["comm"], s["time"]
        if alg == "fedavg_adapter":
            ref = a["reference"]
        rows.append((label, a["overall"], a["tail"], a["head"], a["own"], c["bytes_per_round"],
                     t["mean_round_s"], s["rounds_to_target"]["rounds"]))
        print(f"done {label}: overall {a['overall']:.4f} tail {a['tail']:.4f} ({t['wall_s']:.0f}s)", flush=True)
    fedavg_round = next(r[6] for r in rows if r[0] == "fedavg adapter")
    nocache = time_round_without_cache(raw, out)
    mem = backbone_memory(raw)
    tr, mv = raw["train"], raw["vision"]
    assert ref is not None
    probe = ref["linear_probe"]
    lines = [
        (f"# CIFAR-10-LT (IF 100, Dirichlet 0.1, 10 clients), EfficientNet-Lite0 frozen, "
         f"{args.size}px, n_max {args.n_max}, {tr['rounds']} rounds x {tr['local_epochs']} local epochs, "
         f"lr {tr['lr']}, batch {tr['batch_size']}, seed 0"),
        "",
        ("Adapter / head from configs/cifar10/fedclip.toml: "
         + ", ".join(f"{k} {mv[k]}" for k in MODEL_KEYS if k in mv)
         + ". Timings on a shared 2-core CPU under load from other jobs."),
        "",
        "| method | overall acc | tail acc | head acc | own-split acc | ratio to linear probe | bytes/round | s/round | rounds to 30% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[1] / probe:.3f} | "
                     f"{r[5]:,.0f} | {r[6]:.2f} | {r[7] if r[7] is not None else '-'} |")
    g = ref["groups"]
    for name, key, extra in (("centralized linear probe", "linear_probe", f"L2 {ref['probe_l2']:g}"),
                             ("centralized adapter", "centralized_adapter", f"{ref['adapter_epochs']} epochs")):
        lines.append(f"| reference: {name} ({extra}, pooled {ref['train_examples']} images) | "
                     f"{g[key]['overall']:.4f} | {g[key]['tail']:.4f} | {g[key]['head']:.4f} | - | "
                     f"{g[key]['overall'] / probe:.3f} | - | - | - |")
    lines += [
        "",
        "| cost | value |",
        "|---|---|",
        f"| s/round fedavg adapter, feature cache | {fedavg_round:.2f} |",
        f"| s/round fedavg adapter, full forward passes (no cache) | {nocache:.2f} |",
        f"| speed-up from the cache | {nocache / fedavg_round:.1f}x |",
        f"| backbone bytes fp32 | {mem['fp32']:,} |",
        f"| backbone bytes NF4 (double quant) | {mem['nf4']:,} |",
        f"| memory ratio fp32 / NF4 | {mem['fp32'] / mem['nf4']:.2f}x |",
        f"| feature cosine fp32 vs NF4 (64 test images) | {mem['feature_cosine']:.3f} |",
        (f"| benchmark wall time{' (cold feature cache)' if args.cold else ''} | "
        f"{time.perf_counter() - t_all:.0f} s |"),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (out.parent / "cifar10_lt.md").write_text(text)


if __name__ == "__main__":
    main()
