"""``fedblend bench``: how close fedblend's text path comes to the machine, in one run.

Order: the matmul peak in float32 and in bfloat16; FedIT on flan8 + SmolLM2 (training
efficiency, seconds and engine overhead per round); the naive reference loop on the same config
(``naive_ratio`` = its round time / fedblend's); FedDPA-T (training efficiency, then P and TTP
evaluation efficiency, TTP cross-client batched vs client after client); FedDPA-T again in the
other precision (training, P, TTP: ``bf16_speedup``, bfloat16's useful FLOP rate over float32's
per phase); backbone bytes and peak RSS per quantization (one process each); vision feature
extraction images/s. Every phase runs in ``--dtype`` (``model.dtype``; default float32) except
the other-precision FedDPA-T, and each phase's efficiency divides by the peak of the precision
it ran in, measured during it.
Scales: ``quick`` (a few minutes on 2 CPU cores), ``full`` (the issue's side-by-side scale:
8 clients x 16 examples, batch 16 / micro-batch 8, 2 epochs), ``tiny`` (tests: random tiny
Llama and CLIP, synthetic data, seconds).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fedblend.bench.flops import DTYPES, TARGETS, RateProbe, efficiency, matmul_peak
from fedblend.bench.memory import QUANTIZATIONS, measure_in_process, measure_in_subprocesses
from fedblend.bench.text import evaluate_timed, has_cross_client_batch, train_session
from fedblend.bench.vision import check_images, images_per_s
from fedblend.config import ExperimentConfig, config_from_dict
from fedblend.errors import ConfigError, FedblendError
from fedblend.modality import peak_rss_mb
from fedblend.runlog import third_party_to

Say = Callable[[str], None]
NAIVE_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "naive_reference.py"

FLAN8 = {
    "model": {"source": "smollm2", "max_length": 256},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "data": {"kind": "instructions", "layout": "file_per_client"},
    "eval": {"batch_size": 16, "metric": "rougeL"},
    "feddpa": {"weighting": "dynamic", "dynamic_top_k": 5},
}
SCALES: dict[str, dict[str, Any]] = {
    # quick: the shipped flan8 configs' batch shape (16 / micro-batch 8), fewer clients and steps
    "quick": {"data": {"num_clients": 4, "max_train_per_client": 16},
              "train": {"rounds": 2, "local_epochs": 1, "lr": 1e-3, "batch_size": 16,
                        "micro_batch_size": 8},
              "eval": {"max_per_task": 4, "max_new_tokens": 16}},
    "full": {"data": {"num_clients": 8, "max_train_per_client": 16},
             "train": {"rounds": 2, "local_epochs": 2, "lr": 1e-3, "batch_size": 16,
                       "micro_batch_size": 8},
             "eval": {"max_per_task": 5, "max_new_tokens": 16}},
    "tiny": {"model": {"source": "tiny", "max_length": 64},
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
             "data": {"kind": "synthetic", "num_clients": 3, "synthetic_train_per_client": 4,
                      "synthetic_test_per_task": 2},
             "train": {"rounds": 1, "local_epochs": 1, "lr": 5e-3, "batch_size": 4,
                       "micro_batch_size": 2},
             "eval": {"max_per_task": 2, "max_new_tokens": 4, "batch_size": 8},
             "feddpa": {"dynamic_top_k": 2}},
}
# without AMX or AVX512-BF16 torch multiplies bfloat16 matrices on a fallback kernel (0.1 GFLOP/s
# on an AMD EPYC with AVX2 only): a 2048^2 product would take minutes, so the bfloat16 peak is
# measured on smaller ones there (the size is in the JSON)
FALLBACK_BF16_SIZE = 256
SIZES = {"quick": {"matmul": 2048, "images": 128, "bf16_fallback": FALLBACK_BF16_SIZE},
         "full": {"matmul": 2048, "images": 512, "bf16_fallback": FALLBACK_BF16_SIZE},
         "tiny": {"matmul": 256, "images": 16, "bf16_fallback": 128}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def bench_config(algorithm: str, scale: str, data_dir: Path | None,
                 dtype: str = "float32") -> ExperimentConfig:
    raw = _merge(FLAN8 if scale != "tiny" else {}, SCALES[scale])
    raw["model"] = {**raw.get("model", {}), "dtype": dtype}
    if data_dir is not None:
        raw["data"]["dir"] = str(data_dir)
    raw.update(name=f"bench-{algorithm}", algorithm=algorithm, seed=42,
               engine={"progress": False, "checkpoint_every": 1})
    return config_from_dict(raw, source=f"bench ({scale})")


def check_inputs(scale: str, data_dir: Path, images_dir: Path) -> None:
    """Fail at once, in one line, where the data or the offline model is missing."""
    if scale == "tiny":
        return
    if not (data_dir / "test.jsonl").is_file():
        raise ConfigError(f"--data: no flan8 data (test.jsonl) in {data_dir}")
    check_images(images_dir)
    from fedblend.text.backbone import smollm2_checkpoint

    smollm2_checkpoint()  # ConfigError naming the offline package when it is missing


def runs_other_precision(scale: str, dtype: str, native: bool) -> bool:
    """Whether the bench runs FedDPA-T in the other precision too: where bfloat16 is native,
    at the tiny scale (seconds even on a fallback kernel), or when bfloat16 was asked for;
    not for a float32 bench on a CPU whose bfloat16 products run on torch's fallback kernel."""
    return native or scale == "tiny" or dtype == "bfloat16"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _rate(rec: dict[str, Any] | None) -> float | None:
    """A measured record's useful GFLOP/s."""
    return rec["flops"] / rec["seconds"] / 1e9 if rec and rec.get("flops") and rec.get("seconds") else None


def _free() -> None:
    gc.collect()


def _load_naive() -> Any:
    if not NAIVE_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fedblend_naive_reference", NAIVE_PATH)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


STEP_S: dict[str, float] = {}


def _step(name: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Run one measurement; a user error stops the bench, any other failure is recorded
    (``detail.errors``) and the measurement reported as null. Wall seconds in ``STEP_S``."""
    t = time.perf_counter()
    try:
        return fn()
    except FedblendError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed in the table
        errors[name] = f"{e.__class__.__name__}: {e}"[:500]
        return None
    finally:
        STEP_S[name] = time.perf_counter() - t


def run_bench(scale: str, data_dir: Path, images_dir: Path, log_file: Path, threads: int = 0,
              say: Say = lambda m: None, dtype: str = "float32") -> dict[str, Any]:
    """Measure everything with ``threads`` torch threads (0: as set; the tiny scale uses 1),
    the main phases in ``dtype`` (float32, bfloat16, or auto: this CPU's choice, see
    :func:`fedblend.device.resolve_dtype`); returns the bench JSON (see the module docstring)."""
    from fedblend.device import resolve_dtype

    if dtype not in (*DTYPES, "auto"):
        raise ConfigError(f"--dtype: expected float32, bfloat16 or auto, got {dtype!r}")
    dtype = resolve_dtype(dtype, torch.device("cpu"))
    check_inputs(scale, data_dir, images_dir)
    tiny = scale == "tiny"
    work = Path(tempfile.mkdtemp(prefix="fedblend-bench-"))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    saved_threads = torch.get_num_threads()
    if threads or tiny:  # tiny: tests share a loaded machine, where tiny ops on 2 threads crawl
        torch.set_num_threads(threads or 1)
    STEP_S.clear()
    try:
        with third_party_to(log_file), open(log_file, "a") as out, \
                contextlib.redirect_stdout(out):
            result = _measure(scale, None if tiny else data_dir, None if tiny else images_dir,
                              work, say, dtype)
    finally:
        torch.set_num_threads(saved_threads)
        shutil.rmtree(work, ignore_errors=True)
    result["detail"]["bench_wall_s"] = time.perf_counter() - t0
    result["detail"]["log"] = str(log_file)
    return result


def _measure(scale: str, data_dir: Path | None, images_dir: Path | None, work: Path,
             say: Say, dtype: str = "float32") -> dict[str, Any]:
    from fedblend.device import bf16_native

    errors: dict[str, str] = {}
    other = "bfloat16" if dtype == "float32" else "float32"
    native, why = bf16_native(torch.device("cpu"))
    detail: dict[str, Any] = {"scale": scale, "threads": torch.get_num_threads(), "errors": errors,
                              "torch": torch.__version__, "python": sys.version.split()[0],
                              "dtype": dtype, "bf16_native": native, "bf16_reason": why}
    say(f"matmul peak ({SIZES[scale]['matmul']}^2 float32 and bfloat16, {torch.get_num_threads()} threads)")
    sizes = {"float32": SIZES[scale]["matmul"],
             "bfloat16": SIZES[scale]["matmul"] if native else SIZES[scale]["bf16_fallback"]}
    peaks = {d: matmul_peak(sizes[d], dtype=d) for d in DTYPES}
    detail["peak"] = peaks[dtype]
    detail["peaks"] = peaks
    gf = float(peaks[dtype]["gflops"])
    # the peak again during every phase, in the phase's precision: a burst before each local
    # update / generation batch
    probe = RateProbe(SIZES[scale]["matmul"], dtype=dtype, sizes=sizes)

    def phase(name: str, fn: Callable[[], Any], burst_first: bool = False, in_dtype: str = dtype) -> Any:
        probe.start(name, in_dtype)
        if burst_first:  # a phase without units the probe can sit between (the naive loop)
            probe.sample()
        try:
            return _step(name, errors, fn)
        finally:
            probe.finish()

    say("fedit: training rounds on the in-process engine")
    fedit_cfg = bench_config("fedit", scale, data_dir, dtype)
    detail["config"] = {k: fedit_cfg.to_dict()[k] for k in ("model", "lora", "data", "train", "eval")}
    fedit = phase("fedit", lambda: train_session(fedit_cfg, work / "fedit", probe))
    train_detail: dict[str, Any] = {}
    if fedit is not None:
        train_detail["fedit"] = fedit.train
        detail["linear_params"] = {"body": fedit.counts.body, "output_projection": fedit.counts.head}
    del fedit
    _free()

    say("naive reference: a Hugging Face Trainer per client per round")
    naive = phase("naive", lambda: _run_naive(fedit_cfg, work / "naive"), burst_first=True)
    detail["naive_reference"] = naive

    say("feddpa_t: training rounds, then P and TTP evaluation")
    dpa_cfg = bench_config("feddpa_t", scale, data_dir, dtype)
    dpa = phase("feddpa_t", lambda: train_session(dpa_cfg, work / "feddpa_t", probe))
    ev: dict[str, Any] = {}
    if dpa is not None:
        train_detail["feddpa_t"] = dpa.train
        cross = has_cross_client_batch(dpa.cfg)
        from fedblend.text.metrics import score

        score(["warm up"], ["warm up"])  # one-time imports of the scorer: not evaluation time
        ev["P"] = phase("eval_P", partial(evaluate_timed, dpa, ttp=False, probe=probe))
        ev["TTP"] = phase("eval_TTP", partial(evaluate_timed, dpa, ttp=True, probe=probe,
                                              cross_client_batch=True if cross else None))
        if cross:
            say("feddpa_t: TTP client after client (eval.cross_client_batch = false)")
            ev["TTP_client_after_client"] = phase(
                "eval_TTP_sequential",
                partial(evaluate_timed, dpa, ttp=True, cross_client_batch=False, probe=probe))
        else:
            ev["TTP_client_after_client"] = None
            errors["ttp_batched_speedup"] = "eval.cross_client_batch is not in this build"
    del dpa
    _free()

    tag = f"@{other}"
    other_cfg = bench_config("feddpa_t", scale, data_dir, other)
    if runs_other_precision(scale, dtype, native):
        say(f"feddpa_t in {other}: training rounds, then P and TTP evaluation (bf16_speedup)")
        o = phase("feddpa_t" + tag, lambda: train_session(other_cfg, work / "feddpa_t_other", probe),
                  in_dtype=other)
    else:  # float32 asked for on a CPU that would run bfloat16 on torch's fallback kernels
        o = None
        errors["bf16_speedup"] = (f"not measured: {why}, so bfloat16 products run on torch's fallback "
                                  f"kernels ({peaks['bfloat16']['gflops']:.2f} GFLOP/s here against "
                                  f"{peaks['float32']['gflops']:.0f} in float32) and a bfloat16 FedDPA-T "
                                  "would take hours; --dtype bfloat16 runs it anyway")
    other_train, other_ev = (o.train if o is not None else None), {}
    if o is not None:
        other_ev["P"] = phase("eval_P" + tag, partial(evaluate_timed, o, ttp=False, probe=probe),
                              in_dtype=other)
        other_ev["TTP"] = phase("eval_TTP" + tag, partial(
            evaluate_timed, o, ttp=True, probe=probe,
            cross_client_batch=True if has_cross_client_batch(o.cfg) else None), in_dtype=other)
    del o
    _free()

    say("backbone bytes and peak RSS per quantization (one process each)")
    model = dpa_cfg.model.model_dump(mode="json")
    measure = measure_in_process if scale == "tiny" else measure_in_subprocesses
    mem = _step("memory", errors, lambda: measure(model, dpa_cfg.seed)) or {}
    for q, m in mem.items():
        if "error" in m:
            errors[f"memory_{q}"] = m["error"]

    say("vision feature extraction")
    vis = _step("vision", errors, lambda: images_per_s(images_dir, SIZES[scale]["images"], work))

    phase_of = {"P": "eval_P", "TTP": "eval_TTP"}

    def eff(rec: dict[str, Any] | None, phase: str, start: bool = False) -> float | None:
        """A measured record's useful FLOPs / (seconds x the peak during ``phase``, or the
        start-of-run peak)."""
        rate = gf if start else probe.rate(phase)
        return efficiency(rec["flops"], rec["seconds"], rate) if rec and rec.get("flops") and rate else None

    def efficiencies(start: bool = False) -> dict[str, dict[str, float | None]]:
        return {"training_efficiency": {a: eff(train_detail.get(a), a, start) for a in ("fedit", "feddpa_t")},
                "eval_efficiency": {k: eff(ev.get(k), phase_of[k], start) for k in ("P", "TTP")}}

    # the same three FedDPA-T phases in each precision: records and the probe's phase names
    recs = {dtype: {"train": (train_detail.get("feddpa_t"), "feddpa_t"),
                    "eval_P": (ev.get("P"), "eval_P"), "eval_TTP": (ev.get("TTP"), "eval_TTP")},
            other: {"train": (other_train, "feddpa_t" + tag),
                    "eval_P": (other_ev.get("P"), "eval_P" + tag),
                    "eval_TTP": (other_ev.get("TTP"), "eval_TTP" + tag)}}
    by_dtype = {d: {"peak_gflops": float(peaks[d]["gflops"]),
                    "training_efficiency": {"feddpa_t": eff(*recs[d]["train"])},
                    "eval_efficiency": {"P": eff(*recs[d]["eval_P"]), "TTP": eff(*recs[d]["eval_TTP"])},
                    "gflops": {k: _rate(r) for k, (r, _) in recs[d].items()},
                    "seconds": {k: (r or {}).get("seconds") for k, (r, _) in recs[d].items()}}
                for d in DTYPES}
    by_dtype[dtype]["training_efficiency"]["fedit"] = eff(train_detail.get("fedit"), "fedit")
    bf16_speedup = {k: _ratio(by_dtype["bfloat16"]["gflops"][k], by_dtype["float32"]["gflops"][k])
                    for k in ("train", "eval_P", "eval_TTP")}

    fedit_t = train_detail.get("fedit", {})
    seq, bat = ev.get("TTP_client_after_client") or {}, ev.get("TTP") or {}
    detail.update(training=train_detail, evaluation=ev, vision=vis, step_s=dict(STEP_S),
                  bench_process_peak_rss_mb=peak_rss_mb(), peak_during=probe.summary(),
                  vs_start_peak=efficiencies(start=True),
                  other_precision={"dtype": other, "training": {"feddpa_t": other_train},
                                   "evaluation": other_ev})
    return {
        "dtype": dtype,
        "peak_gflops": gf,
        "peak_gflops_by_dtype": {d: by_dtype[d]["peak_gflops"] for d in DTYPES},
        # each phase's useful FLOP rate / the peak measured during that phase (RateProbe), in
        # the precision the phase ran in (``dtype``)
        **efficiencies(),
        # FedDPA-T training, P and TTP in both precisions, each against its own precision's peak
        "by_dtype": by_dtype,
        # bfloat16's useful FLOP rate over float32's, per phase (same work, so a time ratio; the
        # generated tokens may differ between precisions, hence rates)
        "bf16_speedup": bf16_speedup,
        "ttp_batched_speedup": _ratio(seq.get("seconds"), bat.get("seconds")),
        "naive_ratio": _ratio((naive or {}).get("seconds_per_round"), fedit_t.get("seconds_per_round")),
        "naive_final_loss": (naive or {}).get("final_loss"),
        "fedblend_final_loss": fedit_t.get("final_loss"),
        "backbone_bytes": {q: mem.get(q, {}).get("backbone_bytes") for q in QUANTIZATIONS},
        "peak_rss_mb": {q: mem.get(q, {}).get("peak_rss_mb") for q in QUANTIZATIONS},
        "seconds_per_round": {a: t["seconds_per_round"] for a, t in train_detail.items()},
        "engine_overhead_s_per_round": {
            a: t["engine_overhead_s_per_round"] for a, t in train_detail.items()},
        "vision_images_per_s": (vis or {}).get("images_per_s"),
        "targets": TARGETS,
        "detail": detail,
    }


def _run_naive(cfg: ExperimentConfig, workdir: Path) -> dict[str, Any] | None:
    module = _load_naive()
    if module is None:
        raise FileNotFoundError(f"{NAIVE_PATH} (the naive reference ships in a source checkout)")
    workdir.mkdir(parents=True, exist_ok=True)
    result = module.run_naive(cfg, workdir)
    json.dumps(result)  # JSON-able
    return result
