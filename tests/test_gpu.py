"""A tiny FedDPA-T round and its evaluation on CUDA match the CPU run (marker ``gpu``; skipped
where torch sees no CUDA device, see conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_raw

from fedblend.config import config_from_dict
from fedblend.runner import run_experiment

pytestmark = pytest.mark.gpu


def _run(tmp_path: Path, name: str, **model) -> tuple[dict, list[dict], list[dict]]:
    raw = tiny_raw(algorithm="feddpa_t", model=model, train={"rounds": 2},
                   feddpa={"weighting": "dynamic", "dynamic_top_k": 3})
    s = run_experiment(config_from_dict(raw), tmp_path / name)
    rounds = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    preds = [json.loads(line) for line in
             (tmp_path / name / "eval" / "predictions.jsonl").read_text().splitlines()]
    return s, rounds, preds


def _close(cpu: tuple, gpu: tuple, loss_rtol: float, weight_atol: float) -> None:
    s_cpu, r_cpu, p_cpu = cpu
    s_gpu, r_gpu, p_gpu = gpu
    assert s_gpu["system"]["device"].startswith("cuda") and s_cpu["system"]["device"] == "cpu"
    assert len(r_cpu) == len(r_gpu) == 2
    for a, b in zip(r_cpu, r_gpu, strict=True):  # every client's training loss, every round
        for cid, m in a["client_metrics"].items():
            assert b["client_metrics"][cid]["loss"] == pytest.approx(m["loss"], rel=loss_rtol)
    assert len(p_cpu) == len(p_gpu)
    for a, b in zip(p_cpu, p_gpu, strict=True):  # FedDPA's per-instance weights
        assert (a["client"], a["task"], a["index"]) == (b["client"], b["task"], b["index"])
        assert b["weight"] == pytest.approx(a["weight"], abs=weight_atol)
    for metric in ("P", "TTP"):
        assert s_gpu["mean"][metric] == pytest.approx(s_cpu["mean"][metric], abs=0.1)


def test_feddpa_t_bfloat16_on_cuda_matches_the_cpu_run(tmp_path):
    cpu = _run(tmp_path, "cpu", device="cpu")
    gpu = _run(tmp_path, "cuda_bf16", device="cuda", dtype="bfloat16")
    _close(cpu, gpu, loss_rtol=3e-2, weight_atol=3e-2)


def test_feddpa_t_nf4_on_cuda_matches_the_cpu_run(tmp_path):
    cpu = _run(tmp_path, "cpu_nf4", device="cpu", quantization="nf4")
    gpu = _run(tmp_path, "cuda_nf4", device="cuda", quantization="nf4")
    assert gpu[0]["system"]["quantization"] == "nf4"
    assert gpu[0]["memory"]["backbone_bytes"] == cpu[0]["memory"]["backbone_bytes"]
    _close(cpu, gpu, loss_rtol=1e-2, weight_atol=1e-2)
