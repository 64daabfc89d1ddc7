"""FLOP counts, the machine's matmul peak and efficiency: the arithmetic of ``fedblend bench``.

Counted as *useful* work (LoRA adapters and attention score/value products excluded; LoRA is
< 1% of the linear work at r = 8, attention is a few % at these sequence lengths):

- training (frozen backbone, so no weight gradients for it): forward 2 + input-gradient 2 =
  ``4 x body x non-padding tokens + 4 x head x response positions``, where ``body`` = the
  parameters of the decoder's linear layers (q, k, v, o, gate, up, down) and ``head`` = the
  output projection (vocab x hidden), counted only where the loss needs logits;
- generation: ``2 x body x (prompt + generated tokens) + 2 x head x generated tokens``
  (non-padding; a row's tokens after its EOS are padding); FedDPA's dynamic weighting adds
  ``2 x body x embedded tokens`` (its forward over the test prompts and the client's reference
  prompts, part of the method's inference; the bench JSON gives both parts).

Efficiency = useful FLOPs / (wall seconds x measured peak FLOP/s). On a shared host the float32
matmul rate moves by a third within seconds (98 to 170 GFLOP/s on 2 threads here, between
products a second apart), so one peak read at the start of a run does not describe the machine a
phase minutes later ran on. :class:`RateProbe` therefore measures the peak *during* each phase, a
short best-of-3 burst before every local update or generation batch (its time is not counted as
the phase's), and efficiency divides by the mean of those bursts; the bench reports the same work
against the start-of-run peak too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# the issues' targets, by result key or its first part (all "at least"); the bfloat16 ones
# are for a CPU with AMX (issue 22)
TARGETS = {"training_efficiency": 0.7, "eval_efficiency": 0.5, "ttp_batched_speedup": 2.0,
           "naive_ratio": 1.3, "bf16_speedup.train": 3.0, "bf16_speedup.eval_TTP": 2.0}


def target(key: str) -> float:
    """The target of a verdict key (``training_efficiency.fedit``, ``bf16_speedup.train``)."""
    return TARGETS[key] if key in TARGETS else TARGETS[key.split(".")[0]]


@dataclass(frozen=True)
class LinearCounts:
    body: int  # decoder linear-layer parameters (LoRA excluded)
    head: int  # output projection parameters


def linear_counts(model: torch.nn.Module) -> LinearCounts:
    """Linear-layer parameters of a (PEFT-wrapped, possibly quantized) causal LM: in x out of
    every ``nn.Linear`` outside LoRA, split into the output projection and the rest."""
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = head = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or "lora_" in name:
            continue
        n = int(m.in_features) * int(m.out_features)
        if m is head_mod or name.endswith("lm_head"):
            head += n
        else:
            body += n
    return LinearCounts(body, head)


def train_flops(c: LinearCounts, tokens: float, response_tokens: float) -> float:
    """Useful FLOPs of training on ``tokens`` non-padding tokens, ``response_tokens`` of
    which are positions whose logits the loss needs."""
    return 4.0 * c.body * tokens + 4.0 * c.head * response_tokens


def eval_flops(c: LinearCounts, prompt_tokens: float, generated_tokens: float) -> float:
    """Useful FLOPs of greedy generation (prefill of the prompts + one step per new token)."""
    return 2.0 * c.body * (prompt_tokens + generated_tokens) + 2.0 * c.head * generated_tokens


def efficiency(flops: float, seconds: float, peak_gflops: float) -> float | None:
    """Achieved / peak FLOP rate; None when there is nothing to divide."""
    if seconds <= 0 or peak_gflops <= 0 or flops <= 0:
        return None
    return flops / (seconds * peak_gflops * 1e9)


DTYPES = ("float32", "bfloat16")


def matmul_peak(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict[str, float | int | str]:
    """The matmul peak in ``dtype`` (float32 or bfloat16) with the current torch thread count:
    best of ``repeats`` products of two ``size`` x ``size`` matrices (after one warm-up). On a
    CPU with AMX the bfloat16 products run on its tiles; without it (or AVX512-BF16) torch
    converts to float32 around the products, and the bfloat16 peak comes out below float32's."""
    g = torch.Generator().manual_seed(0)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, generator=g).to(dt)
    b = torch.randn(size, size, generator=g).to(dt)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return {"gflops": 2.0 * size**3 / best / 1e9, "size": size, "repeats": repeats,
            "best_s": best, "threads": torch.get_num_threads(), "dtype": dtype}


@dataclass
class RateProbe:
    """The matmul peak measured *during* a phase: :meth:`sample` (a best-of-``repeats`` burst
    of ``size`` x ``size`` products) is called between a phase's units of work (local updates,
    generation batches); its seconds are kept so the phase's own time can leave them out. Each
    phase's bursts run in the precision the phase computes in (:meth:`start`'s ``dtype``), so
    its efficiency is measured against the peak of that precision."""

    size: int = 2048
    repeats: int = 3
    samples: dict[str, list[float]] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)  # probe seconds per phase
    dtypes: dict[str, str] = field(default_factory=dict)  # phase -> the precision of its bursts
    phase: str = "start"
    dtype: str = "float32"
    sizes: dict[str, int] = field(default_factory=dict)  # a matrix size per precision (default: size)

    def sample(self) -> float:
        t = time.perf_counter()
        self.dtypes[self.phase] = self.dtype
        size = self.sizes.get(self.dtype, self.size)
        gflops = float(matmul_peak(size, self.repeats, self.dtype)["gflops"])
        self.samples.setdefault(self.phase, []).append(gflops)
        self.spent[self.phase] = self.spent.get(self.phase, 0.0) + time.perf_counter() - t
        return gflops

    def burst(self) -> float:
        """One :meth:`sample`; returns the seconds it took, for the caller to leave out of the
        time of the work it measures."""
        t = time.perf_counter()
        self.sample()
        return time.perf_counter() - t

    def start(self, phase: str, dtype: str | None = None) -> None:
        """Samples from now on belong to ``phase`` and run in ``dtype`` (None: as before)."""
        self.phase = phase
        if dtype is not None:
            self.dtype = dtype

    def finish(self) -> None:
        """One burst after the phase's last unit (each unit already has one before it)."""
        self.sample()

    def rate(self, phase: str) -> float | None:
        """Mean GFLOP/s of the phase's bursts (None if it took none)."""
        xs = self.samples.get(phase)
        return sum(xs) / len(xs) if xs else None

    def summary(self) -> dict[str, dict[str, float | int]]:
        return {ph: {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs),
                     "probe_s": self.spent.get(ph, 0.0), "dtype": self.dtypes.get(ph, "float32")}
                for ph, xs in self.samples.items()}
