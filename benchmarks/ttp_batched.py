"""TTP evaluation wall time: cross-client batched vs client after client (flan8, FedDPA-T).

Every client's model answers every task (TTP). The same trainer, federation, adapters and
test inputs are evaluated with ``eval.cross_client_batch`` on and off, alternating which
goes first, ``--reps`` times each; the predictions of the two paths are compared too.
Adapters are fresh random per client (PEFT's init for A, small random B, so the clients'
models differ and generation stays sane), which costs the same as trained ones: evaluation
time does not depend on the adapter values, only on the lengths generated, which the
prediction check shows are the same. Dynamic FedDPA weights (the default of the shipped
config) embed every test input with each client's own local adapter; that time is reported
apart (``embed s``), it is the same work in both modes.

    nice -n 10 python benchmarks/ttp_batched.py --reps 3 --threads 1 --set eval.max_per_task=2 \
        --set feddpa.dynamic_reference=8 --set model.max_length=128 --out runs/ttp_batched.json

(the scale of benchmarks/results/ttp_batched.md; drop the --set flags for 3 test examples per
task, all 32 reference prompts and 256-token prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALE = ["eval.max_per_task=3", "eval.max_new_tokens=16", "engine.progress=false"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flan8" / "feddpa_t.toml")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flan8"))
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per mode (alternating)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    args = ap.parse_args()

    import torch

    from fedblend.algorithms import make_algorithm
    from fedblend.algorithms.base import ClientContext, client_seed
    from fedblend.comm.codec import Message
    from fedblend.config import load_config
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.federation import build_federation
    from fedblend.text.protocol import evaluate_text
    from fedblend.text.trainer import TextTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, SCALE + [f"data.dir={args.data}"] + args.set)
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    tr = TextTrainer(cfg, model, tok)
    fed = build_federation(cfg)
    algo = make_algorithm(cfg)

    def adapter(role: str, seed: int) -> dict[str, torch.Tensor]:
        fresh = tr.adapters.fresh(role, seed)
        g = torch.Generator().manual_seed(seed)
        return {k: (torch.randn(v.shape, generator=g) * 0.01 if ".lora_B." in k else v)
                for k, v in fresh.items()}

    final = Message({"global": adapter("global", cfg.seed)})
    finals = {c.cid: final for c in fed.clients}
    states = {c.cid: {"local": adapter("local", cfg.seed + 1 + c.cid)} for c in fed.clients}
    embed_s = [0.0]
    plain_embed = tr.embed

    def timed_embed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return plain_embed(*a, **kw)
        finally:
            embed_s[0] += time.perf_counter() - t0

    tr.embed = timed_embed  # type: ignore[method-assign]

    def run(batched: bool) -> tuple[float, float, float, dict]:
        contexts = {c.cid: ClientContext(c.cid, cfg.train.rounds, client_seed(cfg.seed, cfg.train.rounds, c.cid),
                                         c.train, tr, cfg) for c in fed.clients}
        embed_s[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate_text(algo, tr, fed, finals, states, contexts, ttp=True, cross_client=batched)
        return time.perf_counter() - t0, time.process_time() - c0, embed_s[0], res

    rows = sum(len(v) for v in fed.test_by_task.values()) * len(fed.clients)
    print(f"{len(fed.clients)} clients, {rows} TTP generations per mode, batch {cfg.eval.batch_size}, "
          f"max_new_tokens {cfg.eval.max_new_tokens}, torch threads {torch.get_num_threads()}", flush=True)
    warm = [e.instruction for e in fed.clients[0].train[:2]]  # first-call allocations, untimed
    tr.embed(warm, {"local": 1.0})
    tr.generate(warm, {"global": 1.0})
    times: dict[str, list[dict[str, float]]] = {"client_after_client": [], "cross_client_batch": []}
    preds: dict[str, dict] = {}
    for rep in range(args.reps):
        for batched in ((False, True) if rep % 2 == 0 else (True, False)):
            label = "cross_client_batch" if batched else "client_after_client"
            wall, cpu, emb, res = run(batched)
            times[label].append({"wall_s": wall, "cpu_s": cpu, "embed_s": emb})
            preds[label] = {cid: ev.predictions for cid, ev in res.items()}
            print(f"rep {rep} {label:20s} wall {wall:7.1f} s  process CPU {cpu:7.1f} s  "
                  f"embed (wall) {emb:6.1f} s", flush=True)
    same = preds["client_after_client"] == preds["cross_client_batch"]
    n_same = sum(
        p == preds["cross_client_batch"][cid][t][i]
        for cid, by_task in preds["client_after_client"].items()
        for t, ps in by_task.items() for i, p in enumerate(ps)
    )
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in times.items()}
    speedup = med["client_after_client"] / med["cross_client_batch"]
    print(f"median wall: client after client {med['client_after_client']:.1f} s, "
          f"cross-client batch {med['cross_client_batch']:.1f} s, speed-up {speedup:.2f}x; "
          f"identical predictions: {n_same}/{rows}" + (" (all)" if same else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "config": str(args.config), "overrides": SCALE + args.set, "clients": len(fed.clients),
            "generations_per_mode": rows, "torch_threads": torch.get_num_threads(),
            "runs": times, "median_wall_s": med, "speedup": speedup,
            "identical_predictions": n_same,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
