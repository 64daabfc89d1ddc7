"""``fedblend bench``: matmul peaks, training / evaluation efficiency, bfloat16 speed-up,
cross-client TTP speed-up,
the naive-reference ratio, memory per quantization, round times, vision images/s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedblend.bench.core import Say, run_bench
from fedblend.bench.report import print_bench, verdicts

__all__ = ["bench", "print_bench", "run_bench", "verdicts"]


def bench(scale: str, out: Path, data_dir: Path, images_dir: Path, threads: int = 0,
          say: Say = lambda m: None, dtype: str = "float32") -> dict[str, Any]:
    """Run the bench and write its JSON (with the verdicts, ``met``) to ``out``."""
    result = run_bench(scale, data_dir, images_dir, out.with_suffix(".log"), threads, say, dtype)
    result["met"] = verdicts(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
