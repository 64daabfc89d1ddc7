"""Local-training speed and memory of fedblend's text trainer, one optimisation at a time.

The workload is one FedIT local update as in configs/flan8/fedit.toml: client 0's 32 flan8
examples, SmolLM2-135M-Instruct, batch 16, micro-batch 8, LoRA r=8 on q_proj/v_proj
(``--epochs``, default 0.5 = one optimizer step, keeps each run short on a loaded machine).
Each measured run is a fresh process (so its peak RSS is its own) that loads the backbone,
then times the update of client 0 (the process's first training). The variants add one
optimisation at a time:

- ``base``: all off: full-vocabulary logits at every position, the unused ``local`` adapter
  computed at weight 0, random micro-batches, no checkpointing (main's code before issue 12);
- ``+response``: logits only at the response positions (``logits_to_keep`` mask);
- ``+skip``: the zero-weight ``local`` role left out of the LoRA layers;
- ``+group``: each batch sorted by length before it is split into micro-batches;
- ``+ckpt``: ``train.gradient_checkpointing = true`` on top of the others.

Runs alternate between variants (round-robin, ``--repeats`` rounds), so a change in the
machine's load hits every variant alike. The padding fraction of length grouping is also
measured over all 8 clients (their 32 examples tokenized with SmolLM2's tokenizer, the
trainer's own batch sampling, ``train.local_epochs`` epochs). Writes ``--out`` (markdown)
and the raw runs beside it (JSON).

    nice -n 10 python benchmarks/train_speed.py            # about 10-15 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flan8" / "fedit.toml"
VARIANTS = {  # name -> (response logits, skip zero roles, group by length, checkpointing)
    "base": (False, False, False, False),
    "+response": (True, False, False, False),
    "+skip": (True, True, False, False),
    "+group": (True, True, True, False),
    "+ckpt": (True, True, True, True),
}
LABELS = {
    "base": "base (all off = main before issue 12)",
    "+response": "+ response-only logits",
    "+skip": "+ skip zero-weight local role",
    "+group": "+ length-grouped micro-batches (defaults)",
    "+ckpt": "+ gradient checkpointing",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Polls this process's resident set every 5 ms while in the ``with`` block."""

    def __enter__(self) -> Self:
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _config(args, extra: list[str]):
    from fedblend.config import load_config

    return load_config(CONFIG, [f"data.dir={args.data}", *extra])


def worker(args) -> dict:
    """One measured run of ``args.worker`` (prints one JSON line)."""
    import torch

    from fedblend.algorithms.base import ClientContext, client_seed
    from fedblend.algorithms.fedit import train_global
    from fedblend.comm.codec import Message
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.federation import build_federation
    from fedblend.text.trainer import TextTrainer

    response, skip, group, ckpt = VARIANTS[args.worker]
    extra = [] if args.main_api else [
        f"train.group_by_length={str(group).lower()}", f"train.gradient_checkpointing={str(ckpt).lower()}"
    ]
    cfg = _config(args, extra)
    fed = build_federation(cfg)
    model, tok = load_text_backbone(cfg.model, seed=cfg.seed)
    tr = TextTrainer(cfg, model, tok)
    tr.response_logits = None if response else False  # None: probed on the first train()
    tr.adapters.skip_zero_roles = skip
    widths: list[tuple[int, int, int]] = []  # (rows, width, real tokens) per micro-batch
    collate = tr._collate

    def counting_collate(batch):
        widths.append((len(batch), max(len(x) for x, _ in batch), sum(len(x) for x, _ in batch)))
        return collate(batch)

    tr._collate = counting_collate
    g0 = tr.adapters.fresh("global", cfg.seed)

    def update(cid: int, examples, epochs: float) -> tuple[Message, float]:
        """FedIT's local update (fedit.train_global) of one client, timed."""
        ctx = ClientContext(cid=cid, round=0, seed=client_seed(cfg.seed, 0, cid), examples=examples,
                            trainer=tr, cfg=cfg)
        t0 = time.perf_counter()
        msg = train_global(ctx, Message({"global": g0}, len(examples)), epochs)
        return msg, time.perf_counter() - t0

    rss0 = _rss_mb()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with _PeakRss() as peak:  # the process's first training: its working set shows in the RSS
        msg, seconds = update(0, fed.client(0).train, args.epochs)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    slots = sum(r * w for r, w, _ in widths)
    return {
        "variant": args.worker, "seconds": seconds,
        "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, "steps": msg.metrics["steps"],
        "loss": msg.metrics["loss"], "rss_before_mb": rss0, "peak_rss_mb": peak.peak,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "padding": 1 - sum(t for *_, t in widths) / slots, "threads": torch.get_num_threads(),
        "response_logits": bool(getattr(tr, "response_logits", False)),
    }


def padding_by_grouping(args) -> dict:
    """Padding fraction over all clients' micro-batches, with and without length grouping,
    under the trainer's own batch sampling (``sample_batches``) for the config's own
    ``train.local_epochs``."""
    from fedblend.algorithms.base import client_seed
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.federation import build_federation
    from fedblend.text.trainer import TextTrainer, sample_batches

    cfg = _config(args, [])
    tc, fed = cfg.train, build_federation(cfg)
    model, tok = load_text_backbone(cfg.model, seed=cfg.seed)
    tr = TextTrainer(cfg, model, tok)
    out = {}
    for group in (False, True):
        real = slots = 0
        for c in fed.clients:
            data = tr.tokenize(c.cid, c.train)
            rng = random.Random(client_seed(cfg.seed, 0, c.cid))
            for idx in sample_batches(len(data), tc.batch_size, tr.train_steps(len(data), tc.local_epochs), rng):
                lens = [len(data[i][0]) for i in idx]
                if group:
                    lens.sort()
                for s in range(0, len(lens), tc.micro_batch_size):
                    part = lens[s : s + tc.micro_batch_size]
                    real, slots = real + sum(part), slots + len(part) * max(part)
        out["grouped" if group else "random"] = {"padding": 1 - real / slots, "slots": slots, "tokens": real}
    out["epochs"] = tc.local_epochs
    return out


def _run_worker(args, variant: str, src: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--epochs", str(args.epochs), "--data", args.data]
    if src != ROOT / "src":
        cmd.append("--main-api")
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _table(runs: list[dict], order: list[str]) -> list[str]:
    base = statistics.median(r["seconds"] for r in runs if r["variant"] == order[0])
    base_cpu = statistics.median(r["cpu_seconds"] for r in runs if r["variant"] == order[0])
    lines = [
        ("| variant | runs | wall s (median) | wall min-max | vs base | CPU s (median) | CPU min-max "
        "| vs base | padding | peak RSS MB | RSS growth MB | loss |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in order:
        rs = [r for r in runs if r["variant"] == v]
        s, c = [r["seconds"] for r in rs], [r["cpu_seconds"] for r in rs]
        grow = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in rs)
        lines.append(
            f"| {LABELS.get(v, v)} | {len(rs)} | {statistics.median(s):.1f} | {min(s):.1f}-{max(s):.1f} "
            f"| {statistics.median(s) / base:.2f}x | {statistics.median(c):.1f} | {min(c):.1f}-{max(c):.1f} "
            f"| {statistics.median(c) / base_cpu:.2f}x | {statistics.median(r['padding'] for r in rs):.1%} "
            f"| {statistics.median(r['peak_rss_mb'] for r in rs):.0f} | {grow:.0f} "
            f"| {statistics.median(r['loss'] for r in rs):.4f} |"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_speed.md")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flan8"))
    ap.add_argument("--epochs", type=float, default=0.5, help="0.5 = one step of 16 examples")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--main-src", type=Path, default=None,
                    help="also time this source tree (e.g. /work/main/src) as variant 'main'")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--main-api", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    order = args.variants.split(",")
    plan = [(v, ROOT / "src") for v in order] + ([("main", args.main_src)] if args.main_src else [])
    runs: list[dict] = []
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for v, src in plan[rep % len(plan):] + plan[: rep % len(plan)]:  # rotate the start
            r = _run_worker(args, "base" if v == "main" else v, src)
            r["variant"] = v
            runs.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {v:10s} {r['seconds']:6.1f} s "
                  f"cpu {r['cpu_seconds']:6.1f} s  "
                  f"peak {r['peak_rss_mb']:.0f} MB  padding {r['padding']:.1%}", flush=True)
    pad = padding_by_grouping(args)
    if args.main_src:
        order = ["main", *order]
    raw = {"runs": runs, "padding_all_clients": pad, "epochs": args.epochs, "repeats": args.repeats,
           "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(), "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    steps = runs[0]["steps"]
    lines = [
        "# Local-training speed: one FedIT update on flan8 with SmolLM2-135M (CPU)",
        "",
        (f"Client 0 of configs/flan8/fedit.toml: 32 examples, batch 16, micro-batch 8, {args.epochs:g} "
        f"epoch(s) = {steps} optimizer steps, LoRA r=8 on q_proj/v_proj, float32, "
        f"{runs[0]['threads']} torch threads. Each run is a fresh process (backbone load, then the "
        "timed update, the process's first training); variants alternate round-robin. 'CPU s' is "
        "the process's user+system time during the update (less sensitive to other jobs than "
        "wall time). 'peak RSS' is the process's resident set polled every 5 ms during the "
        "update; 'growth' is that peak minus the RSS just before it. Reproduce: `nice -n 10 python benchmarks/train_speed.py`."),
        "",
        *_table(runs, order),
        "",
        (f"Padding over all 8 clients' micro-batches ({raw['padding_all_clients']['random']['slots']} "
        f"token slots at random, {int(pad['random']['tokens'])} real tokens, configs/flan8/fedit.toml's "
        f"sampling for its {pad['epochs']:g} local epochs): random micro-batches "
        f"{pad['random']['padding']:.1%}, length-grouped {pad['grouped']['padding']:.1%} "
        f"({pad['grouped']['slots']} slots)."),
        "",
        (f"Load average at the end: {', '.join(f'{x:.1f}' for x in raw['load_avg_end'])} on "
        f"{raw['cpus']} cores (other jobs were running: compare variants within this table only)."),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
