"""The bench's verdicts against the issue's targets and its terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fedblend.bench.flops import target
from fedblend.console import console, fmt_bytes


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: met (True), not met (False) or not measured (None)."""
    checks: dict[str, float | None] = {
        f"training_efficiency.{a}": v for a, v in result["training_efficiency"].items()}
    checks.update({f"eval_efficiency.{k}": v for k, v in result["eval_efficiency"].items()})
    checks["ttp_batched_speedup"] = result["ttp_batched_speedup"]
    checks["naive_ratio"] = result["naive_ratio"]
    for k in ("train", "eval_TTP"):
        checks[f"bf16_speedup.{k}"] = (result.get("bf16_speedup") or {}).get(k)
    return {k: None if v is None else v >= target(k) for k, v in checks.items()}


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def print_bench(result: dict[str, Any], out: Any = None) -> None:
    met = result.get("met") or verdicts(result)
    d = result["detail"]
    dtype = result.get("dtype", "float32")
    t = Table(title=f"fedblend bench ({d['scale']}; {dtype}; peak {result['peak_gflops']:.1f} GFLOP/s "
                    f"{dtype} matmul, {d['threads']} threads)")
    for col in ("measure", "value", "target", "verdict"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    for key, ok in met.items():
        v = result
        for part in key.split("."):
            v = v[part]
        top = key.split(".")[0]
        unit = "x" if top in ("ttp_batched_speedup", "naive_ratio", "bf16_speedup") else ""
        verdict = "not measured" if ok is None else ("met" if ok else "not met")
        t.add_row(key, _num(v, ".2f") + (unit if v is not None else ""),
                  f">= {target(key):g}{unit}", verdict,
                  style=None if ok is None else ("green" if ok else "red"))
    console.print(t)
    rates, start = d.get("peak_during") or {}, d.get("vs_start_peak") or {}
    if rates:
        console.print("efficiency = useful FLOP rate / the matmul peak measured during the phase "
                      "(mean of bursts before each local update or batch): "
                      + "; ".join(f"{ph} {r['mean']:.3g} ({r['min']:.3g}-{r['max']:.3g}, n={r['n']})"
                                  for ph, r in rates.items()) + " GFLOP/s",
                      highlight=False, soft_wrap=True)
    if start:
        vals = [f"{k}.{a} {_num(v, '.2f')}" for k, by in start.items() for a, v in by.items()]
        console.print(f"against the start-of-run peak {result['peak_gflops']:.1f} GFLOP/s instead: "
                      + ", ".join(vals), highlight=False, soft_wrap=True)
    by = result.get("by_dtype") or {}
    if by:
        p = Table(title=f"feddpa_t in each precision (bf16 native here: {d.get('bf16_native')}; "
                        f"{d.get('bf16_reason', '')})")
        for col in ("precision", "peak GFLOP/s", "train eff", "eval P eff", "eval TTP eff",
                    "train s", "P s", "TTP s"):
            p.add_column(col, justify="left" if col == "precision" else "right")
        for name, r in by.items():
            s = r["seconds"]
            p.add_row(name, _num(r["peak_gflops"], ".1f"), _num(r["training_efficiency"]["feddpa_t"], ".2f"),
                      _num(r["eval_efficiency"]["P"], ".2f"), _num(r["eval_efficiency"]["TTP"], ".2f"),
                      _num(s["train"], ".1f"), _num(s["eval_P"], ".1f"), _num(s["eval_TTP"], ".1f"))
        console.print(p)
        sp = result.get("bf16_speedup") or {}
        console.print("bf16_speedup (bfloat16 useful FLOP rate / float32's): "
                      + ", ".join(f"{k} {_num(v, '.2f')}x" for k, v in sp.items()), highlight=False)
    m = Table(title="memory and speed")
    for col in ("measure", "none", "int8", "nf4"):
        m.add_column(col, justify="left" if col == "measure" else "right")
    bb, rss = result["backbone_bytes"], result["peak_rss_mb"]
    m.add_row("backbone bytes", *(fmt_bytes(bb[q]) if bb[q] is not None else "n/a" for q in bb))
    m.add_row("peak RSS MB", *(_num(rss[q], ".0f") for q in rss))
    console.print(m)
    spr, ovh = result["seconds_per_round"], result["engine_overhead_s_per_round"]
    for a in spr:
        console.print(f"{a}: {spr[a]:.1f} s per round, engine overhead {ovh[a]:.2f} s per round")
    losses = (result.get("fedblend_final_loss"), result.get("naive_final_loss"))
    if None not in losses:
        console.print(f"final training loss: fedblend fedit {losses[0]:.4f}, naive reference {losses[1]:.4f}")
    if result.get("vision_images_per_s") is not None:
        v = d["vision"]
        console.print(f"vision features: {result['vision_images_per_s']:.1f} images/s "
                      f"({v['backbone']}, {v['image_size']} px, {v['images']} images)")
    for name, err in d["errors"].items():
        console.print(f"not measured: {name}: {err}", highlight=False, soft_wrap=True)
    console.print(f"bench wall {d.get('bench_wall_s', 0):.0f} s; third-party log {d.get('log')}"
                  + (f"; JSON {out}" if out else ""), highlight=False, soft_wrap=True)
