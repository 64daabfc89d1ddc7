"""Time the bfloat16 path's options (issue 22) against its baseline, runs alternating.

    python benchmarks/bf16_options.py [--hidden 256 --layers 4 --pairs 5 --threads 1]

Each option is timed against the baseline in alternating runs (baseline, option, baseline, ...)
on fedblend's own TextTrainer: ``train`` (k optimizer steps of LoRA q/v, dropout 0.05) and
``generate`` (greedy, 8 new tokens). The model is a random Llama built like the tests' tiny one
but larger (``--hidden``, ``--layers``; byte-level vocabulary), because SmolLM2 in bfloat16 on a
CPU without AMX or AVX512-BF16 runs its products on torch's fallback kernel (about 0.1 GFLOP/s
on the AMD EPYC this was written on): one SmolLM2 step would take minutes. Prints a markdown
table: median seconds per call and min-max over the pairs, and the option / baseline ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedblend.config import config_from_dict
from fedblend.text.backbone import load_text_backbone
from fedblend.text.federation import build_federation
from fedblend.text.trainer import TextTrainer


def trainer(dtype: str, hidden: int, layers: int) -> tuple[TextTrainer, list]:
    cfg = config_from_dict({
        "name": "bf16-options", "algorithm": "fedit", "seed": 1,
        "model": {"source": "tiny", "max_length": 96, "dtype": dtype, "tiny_hidden_size": hidden,
                  "tiny_layers": layers, "tiny_heads": max(1, hidden // 64), "device": "cpu"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "data": {"kind": "synthetic", "num_clients": 1, "synthetic_train_per_client": 16,
                 "synthetic_test_per_task": 2},
        "train": {"lr": 1e-3, "batch_size": 8, "micro_batch_size": 8},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "engine": {"progress": False},
    })
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    return tr, build_federation(cfg).clients[0].train


def loss_on_bf16_logits(tr: TextTrainer) -> Callable:
    """``_loss_sum`` without the float32 copy of the response logits (cross-entropy in bf16)."""

    def loss_sum(ids, labels, mask):
        targets = labels[:, 1:]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets != -100
        with tr.autocast():
            logits = tr.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        return torch.nn.functional.cross_entropy(logits, targets[keep[:, :-1]], reduction="sum").float()

    return loss_sum


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"random Llama hidden {a.hidden}, {a.layers} layers, {a.threads} thread(s); "
          f"{a.pairs} alternating pairs per row; seconds per call, median (min-max)")
    print("| precision | work | option | baseline s | option s | option / baseline |")
    print("|---|---|---|---|---|---|")
    built = {d: trainer(d, a.hidden, a.layers) for d in ("float32", "bfloat16")}
    work_of = {}
    for dtype, (tr, examples) in built.items():
        tr.train(("c", 0), examples, ["global"], {"global": 1.0}, epochs=0.5, seed=0)  # warm-up
        prompts = [e.instruction for e in examples[:8]]
        work_of[dtype] = {
            "train": lambda tr=tr, ex=examples: tr.train(("c", 0), ex, ["global"], {"global": 1.0},
                                                        epochs=1.0, seed=0),
            "generate": lambda tr=tr, p=prompts: tr.generate(p, {"global": 1.0}),
        }
    for kind in ("train", "generate"):  # the precisions themselves: float32 is the baseline
        base_t, opt_t = [], []
        for _ in range(a.pairs):
            base_t.append(timed(work_of["float32"][kind]))
            opt_t.append(timed(work_of["bfloat16"][kind]))
        b, o = statistics.median(base_t), statistics.median(opt_t)
        print(f"| float32 -> bfloat16 | {kind} | bfloat16 instead of float32 | {b:.3f} "
              f"({min(base_t):.3f}-{max(base_t):.3f}) | {o:.3f} ({min(opt_t):.3f}-{max(opt_t):.3f}) | "
              f"{o / b:.2f} |", flush=True)
    for dtype, (tr, _) in built.items():
        work = work_of[dtype]
        from peft.helpers import disable_input_dtype_casting

        options: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
            "SDPA math backend": ("both", lambda: sdpa_kernel([SDPBackend.MATH])),
            "SDPA flash backend (CPU)": ("both", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
            "LoRA input not cast to float32 (dropout mask and products in bf16)":
                ("both", lambda tr=tr: disable_input_dtype_casting(tr.model)),
            "cross-entropy on bf16 logits (no float32 copy)": ("train", None),
        }
        for name, (which, ctx) in options.items():
            if dtype == "float32" and "bf16" in name:
                continue  # the same computation in float32
            for kind, fn in work.items():
                if which not in ("both", kind):
                    continue
                base_t, opt_t = [], []
                for _ in range(a.pairs):
                    base_t.append(timed(fn))
                    if ctx is None:
                        saved = tr._loss_sum
                        tr._loss_sum = loss_on_bf16_logits(tr)
                        try:
                            opt_t.append(timed(fn))
                        finally:
                            tr._loss_sum = saved
                    else:
                        with ctx():
                            opt_t.append(timed(fn))
                b, o = statistics.median(base_t), statistics.median(opt_t)
                print(f"| {dtype} | {kind} | {name} | {b:.3f} ({min(base_t):.3f}-{max(base_t):.3f}) | "
                      f"{o:.3f} ({min(opt_t):.3f}-{max(opt_t):.3f}) | {o / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
