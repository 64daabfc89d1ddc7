"""Upper bound on training efficiency from the matrix products alone (issue 12).

Times exactly the products a frozen-backbone LoRA training step of SmolLM2-135M must run: the
forward x W^T and the input gradient dy W of every decoder linear layer (q, k, v, o, gate, up,
down; 30 layers) and of the output projection at the response positions. Nothing else runs.
Divides the useful FLOPs (the bench's convention) by that time, and by the float32 matmul peak
read three times beside it.

    python benchmarks/gemm_bound.py [threads]
"""

from __future__ import annotations

import sys
import time

import torch

from fedblend.bench.flops import matmul_peak

H, I, KV, L, V = 576, 1536, 192, 30, 49152  # SmolLM2-135M
SHAPES = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]  # (out, in): q k v o gate up down


def bound(tokens: int, response: int, reps: int = 5) -> tuple[float, float]:
    """Useful FLOPs and the best time of ``reps`` replays of one micro-batch's products."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) for o, i in SHAPES]
    head = torch.randn(V, H, generator=g)
    xs = [(torch.randn(tokens, w.shape[1]), torch.randn(tokens, w.shape[0])) for w in ws]
    xh, dh = torch.randn(response, H), torch.randn(response, V)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        t = time.perf_counter()
        for _ in range(L):
            for w, (x, dy) in zip(ws, xs):
                x @ w.T
                dy @ w
        xh @ head.T
        dh @ head
        best = min(best, time.perf_counter() - t)
    body = sum(o * i for o, i in SHAPES) * L
    return 4.0 * body * tokens + 4.0 * V * H * response, best


def main() -> int:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    peaks = [float(matmul_peak()["gflops"]) for _ in range(3)]
    print(f"threads {torch.get_num_threads()}, peak GFLOP/s (3 reads, best of 5 each): "
          + ", ".join(f"{p:.1f}" for p in peaks))
    for tokens, response in [(8 * 60, 8 * 12), (16 * 60, 16 * 12), (8 * 120, 8 * 24)]:
        flops, s = bound(tokens, response)
        rate = flops / s / 1e9
        print(f"micro-batch of {tokens} tokens, {response} response positions: products alone "
              f"{rate:.1f} GFLOP/s = {rate / max(peaks):.2f} of the best peak read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
