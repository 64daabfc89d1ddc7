"""Backbone bytes and peak RSS per text-backbone quantization, each in its own process (peak
RSS is a per-process high-water mark, so one process per setting keeps them apart).

The worker loads the backbone exactly as a run does (``load_text_backbone``), runs one forward
pass on a short prompt and prints one JSON line: ``{"backbone_bytes", "peak_rss_mb"}``.

    python -m fedblend.bench.memory '{"model": {...}, "seed": 0}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

QUANTIZATIONS = ("none", "int8", "nf4")


def count_bytes(model: Any) -> int:
    """Parameter + buffer bytes of a module (stand-in where the backbone loader has no
    ``backbone_bytes``; a quantized layer's packed weights count at their stored size)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def backbone_bytes_of(model: Any) -> int:
    from fedblend.text import backbone as text

    fn = getattr(text, "backbone_bytes", None)  # the loader's own count, where it has one
    return int(fn(model)) if fn is not None else count_bytes(model)


def quantization_supported() -> bool:
    from fedblend.config import ModelConfig

    return "quantization" in ModelConfig.model_fields


def measure_in_subprocesses(model: dict[str, Any], seed: int, timeout: float = 900
                            ) -> dict[str, dict[str, Any]]:
    """``{quantization: {"backbone_bytes", "peak_rss_mb"} or {"error"}}``, one process each."""
    supported = quantization_supported()

    def one(q: str) -> dict[str, Any]:
        if q != "none" and not supported:
            return {"error": "model.quantization is not in this build"}
        m = dict(model, **({"quantization": q} if supported else {}))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        try:
            p = subprocess.run([sys.executable, "-m", "fedblend.bench.memory",
                                json.dumps({"model": m, "seed": seed})],
                               capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {p.returncode}: {tail[:300]}"}
        return json.loads(lines[-1])

    # memory, not time, is measured: the three processes may overlap
    with ThreadPoolExecutor(max_workers=len(QUANTIZATIONS)) as pool:
        return dict(zip(QUANTIZATIONS, pool.map(one, QUANTIZATIONS), strict=True))


def measure_in_process(model: dict[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """The same per quantization in this process, one after another (the tiny test scale,
    where three interpreter start-ups would cost more than the measurement): ``peak_rss_mb``
    is then this process's high-water mark so far, not a per-setting figure."""
    out: dict[str, dict[str, Any]] = {}
    for q in QUANTIZATIONS:
        if q != "none" and not quantization_supported():
            out[q] = {"error": "model.quantization is not in this build"}
            continue
        try:
            out[q] = {**measure_one(dict(model, **({"quantization": q} if q != "none" else {})), seed),
                      "rss_scope": "process"}
        except Exception as e:  # noqa: BLE001 - reported per setting
            out[q] = {"error": f"{e.__class__.__name__}: {e}"[:300]}
    return out


def own_peak_rss_mb() -> float:
    """This process's own peak resident set: Linux's VmHWM, which an ``exec`` resets
    (``ru_maxrss`` keeps the forking parent's high-water mark across it); elsewhere
    ``ru_maxrss``."""
    from fedblend.modality import peak_rss_mb

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def measure_one(model: dict[str, Any], seed: int) -> dict[str, Any]:
    """Load the backbone as a run does, run one forward pass, count bytes and peak RSS."""
    import torch

    from fedblend.config import ModelConfig
    from fedblend.text.backbone import format_prompt, load_text_backbone

    cfg = ModelConfig.model_validate(model)
    net, tok = load_text_backbone(cfg, seed)
    ids = tok(format_prompt("Name three primary colours."), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        net(input_ids=ids.to(next(net.parameters()).device))
    return {"backbone_bytes": backbone_bytes_of(net), "peak_rss_mb": own_peak_rss_mb()}


def _worker(arg: str) -> dict[str, Any]:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(arg)
    return measure_one(spec["model"], spec.get("seed", 0))


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])), flush=True)
