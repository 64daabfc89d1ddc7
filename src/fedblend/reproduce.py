"""``fedblend reproduce feddpa|tripleplay --budget quick|standard|paper``: run a paper's
protocol at a budget (``resources/reproduce.toml``) and judge each of its claims from paired
differences with 95% intervals: ``agrees`` / ``disagrees`` / ``inconclusive`` (the interval
crosses zero), and "budget too small to decide" when such an interval is wider than the
smallest effect the budget is meant to resolve."""

from __future__ import annotations

import html
import importlib.resources
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedblend.config import ExperimentConfig, config_from_dict
from fedblend.errors import ConfigError
from fedblend.stats import fmt, paired
from fedblend.store.files import atomic_write
from fedblend.store.rundir import RunDir

PAPERS = ("feddpa", "tripleplay")
BUDGETS = ("quick", "standard", "paper")


@dataclass(frozen=True)
class Claim:
    id: str
    sentence: str
    a: str  # method label
    b: str
    metric: str
    direction: int = 1  # +1: the paper says a > b; 0: the paper compares, no direction


FEDDPA_CLAIMS = (
    Claim("dpa_f_vs_fedit_P", "FedDPA-F beats FedIT on personalization (P)", "feddpa_f", "fedit", "P"),
    Claim("dpa_t_vs_fedit_P", "FedDPA-T beats FedIT on personalization (P)", "feddpa_t", "fedit", "P"),
    Claim("dpa_f_vs_local_TTP", "FedDPA-F beats Local on test-time personalization (TTP)",
          "feddpa_f", "local", "TTP"),
    Claim("dpa_t_vs_local_TTP", "FedDPA-T beats Local on test-time personalization (TTP)",
          "feddpa_t", "local", "TTP"),
    Claim("dynamic_vs_static_TTP", "Instance-wise dynamic weighting beats a static weight (FedDPA-F, TTP)",
          "feddpa_f", "feddpa_f_static", "TTP"),
    Claim("dynamic_vs_static_P", "Instance-wise dynamic weighting beats a static weight (FedDPA-F, P)",
          "feddpa_f", "feddpa_f_static", "P"),
    Claim("dpa_t_vs_dpa_f_P", "FedDPA-T vs FedDPA-F on P (the paper reports both strategies)",
          "feddpa_t", "feddpa_f", "P", direction=0),
)
EXTRA_CLAIMS = {
    "fedsa_lora": Claim("dpa_f_vs_fedsa_P", "FedDPA-F vs FedSA-LoRA on P (extra baseline, not a paper claim)",
                        "feddpa_f", "fedsa_lora", "P", direction=0),
    "ffa_lora": Claim("dpa_f_vs_ffa_P", "FedDPA-F vs FFA-LoRA on P (extra baseline, not a paper claim)",
                      "feddpa_f", "ffa_lora", "P", direction=0),
}
TRIPLEPLAY_CLAIMS = (
    Claim("fl_vs_local_acc", "Adapter FL (TriplePlay's federated adapter) beats local adapters on "
          "balanced-test accuracy", "tripleplay", "local_adapter", "accuracy"),
    Claim("lt_help_tail", "Long-tail help (balanced softmax + federated feature GAN) lifts tail-class "
          "accuracy", "tripleplay_lt", "tripleplay", "tail accuracy"),
)


def load_spec(paper: str) -> dict[str, Any]:
    if paper not in PAPERS:
        raise ConfigError(f"paper: unknown {paper!r}; choose from {', '.join(PAPERS)}")
    text = importlib.resources.files("fedblend.resources").joinpath("reproduce.toml").read_text()
    return tomllib.loads(text)[paper]


def available(algorithm: str) -> bool:
    """Whether this build registers ``algorithm`` (extra rows are skipped otherwise)."""
    from fedblend import algorithms

    return algorithm in algorithms.names()


def budget_configs(paper: str, budget: str, overrides: list[str] | None = None) -> dict[str, ExperimentConfig]:
    """Method label -> validated config at ``budget`` (extra methods only when available)."""
    spec = load_spec(paper)
    if budget not in spec["budgets"]:
        raise ConfigError(f"--budget: unknown {budget!r}; choose from {', '.join(spec['budgets'])}")
    b = spec["budgets"][budget]
    methods = dict(spec["methods"])
    for label, sets in spec.get("extra", {}).items():
        algo = next(s.split("=", 1)[1] for s in sets if s.startswith("algorithm="))
        if available(algo):
            methods[label] = sets
    return {
        label: config_from_dict(
            {**spec["base"], "name": f"{spec['base']['name']}-{label}"},
            [*b["overrides"], *sets, *(overrides or [])], source=f"reproduce {paper} --budget {budget}",
        )
        for label, sets in methods.items()
    }


def verdict(diff: dict[str, Any], direction: int, resolve: float) -> tuple[str, bool, str]:
    """(verdict, decided, note) for a paired difference a - b whose claim is a > b
    (``direction`` 1) or a two-sided comparison (``direction`` 0)."""
    lo, hi = diff["lo"], diff["hi"]
    if lo > 0 or hi < 0:
        if direction == 0:
            return ("differs", True, "a ahead" if lo > 0 else "b ahead")
        agrees = (lo > 0) == (direction > 0)
        return ("agrees" if agrees else "disagrees", True, "the 95% interval excludes 0")
    if max(-lo, hi) > resolve:
        return ("inconclusive", False,
                (f"budget too small to decide: the 95% interval [{lo:.3f}, {hi:.3f}] crosses 0 and reaches "
                f"beyond the ±{resolve:.2f} this budget is meant to resolve; run a larger --budget"))
    return ("inconclusive", True, (f"the 95% interval crosses 0 and is within ±{resolve:.2f}: "
            "no difference at the effect size this budget resolves"))


def _static_runs(runs: dict[str, list[Path]], weight: float, out: Path) -> list[Path]:
    """FedDPA-F re-evaluated with one static weight from each seed's trained state."""
    from fedblend.runner import evaluate_run

    dirs = []
    for src in runs["feddpa_f"]:
        dst = out / "feddpa_f_static" / src.name
        if not RunDir(dst).complete:
            evaluate_run(src, ["feddpa.weighting=static", f"feddpa.static_weight={weight}",
                               "engine.progress=false"], dst)
        dirs.append(dst)
    return dirs


def judge(claims: list[Claim], strata: dict[str, list[dict[str, Any]]], resolve: float) -> list[dict[str, Any]]:
    """Each claim with the two methods' values, their paired difference and a verdict."""
    from fedblend.stats import bootstrap

    rows = []
    for c in claims:
        if c.a not in strata or c.b not in strata:
            continue
        sa, sb = [s[c.metric] for s in strata[c.a]], [s[c.metric] for s in strata[c.b]]
        d = paired(sa, sb)
        v, decided, note = verdict(d, c.direction, resolve)
        rows.append({"id": c.id, "claim": c.sentence, "a": c.a, "b": c.b, "metric": c.metric,
                     "direction": "a > b" if c.direction > 0 else "two-sided",
                     "a_value": bootstrap(sa), "b_value": bootstrap(sb), "difference": d,
                     "verdict": v, "decided": decided, "note": note})
    return rows


def _qlora_claims(cfg: ExperimentConfig, bytes_up_per_round: float) -> list[dict[str, Any]]:
    """QLoRA: backbone bytes fp32 vs NF4 (measured by loading both), and what travels per
    round (the adapter) vs the fp32 backbone that full fine-tuning would send. Exact
    measurements, no sampling noise."""
    from fedblend.vision.backbones import load_backbone

    sizes = {}
    for nf4 in (False, True):
        c = config_from_dict(cfg.to_dict(), [f"vision.nf4={str(nf4).lower()}"])
        sizes[nf4] = load_backbone(c.vision, [], c.seed).backbone_bytes
    out = [{
        "id": "qlora_memory", "claim": "QLoRA (NF4 backbone) cuts backbone memory",
        "metric": "backbone bytes", "a_value": sizes[True], "b_value": sizes[False],
        "ratio": sizes[False] / sizes[True], "verdict": "agrees" if sizes[True] < sizes[False] else "disagrees",
        "decided": True, "note": "exact measurement (fp32 / NF4 bytes), no sampling noise",
    }, {
        "id": "adapter_bytes", "claim": "Only the small adapter travels: bytes per client per round "
        "are a fraction of sending the fp32 backbone", "metric": "bytes up per client per round",
        "a_value": bytes_up_per_round, "b_value": sizes[False],
        "ratio": sizes[False] / max(bytes_up_per_round, 1.0),
        "verdict": "agrees" if bytes_up_per_round < sizes[False] else "disagrees", "decided": True,
        "note": "exact measurement, no sampling noise",
    }]
    return out


def reproduce(paper: str, budget: str, out: Path, overrides: list[str] | None = None,
              say=print, n_seeds: int | None = None) -> dict[str, Any]:
    """Run the protocol, judge the claims, write ``out/claims.json`` and ``out/report.html``.
    ``n_seeds`` replaces the budget's number of seeds."""
    from fedblend.compare import run_compare, seed_list
    from fedblend.evidence import method_stats, run_strata

    spec = load_spec(paper)
    configs = budget_configs(paper, budget, overrides)
    b = spec["budgets"][budget]
    t0 = time.perf_counter()
    labels = list(configs)
    seeds = seed_list(spec["base"]["seed"], n_seeds or b["seeds"])
    say(f"reproduce {paper} --budget {budget}: {', '.join(labels)} x {len(seeds)} seed(s) ({b['about']})")
    result = run_compare(list(configs.values()), out / "runs", resume=True, seeds=seeds, labels=labels)
    runs = {r["label"]: [Path(d) for d in r["run_dirs"]] for r in result["runs"]}
    claims = list(FEDDPA_CLAIMS) if paper == "feddpa" else list(TRIPLEPLAY_CLAIMS)
    if paper == "feddpa":
        say("re-evaluating FedDPA-F with a static weight (same trained states)")
        runs["feddpa_f_static"] = _static_runs(runs, spec["static_weight"], out / "runs")
        claims += [EXTRA_CLAIMS[m] for m in EXTRA_CLAIMS if m in runs]
    strata = {label: [run_strata(d) for d in dirs] for label, dirs in runs.items()}
    rows = judge(claims, strata, b["resolve"])
    if paper == "tripleplay":
        s = RunDir(runs["tripleplay"][0]).summary()
        per_client_round = s["comm"]["bytes_up"] / max(1, s["rounds"] * s["data"]["clients"])
        rows += _qlora_claims(configs["tripleplay"], per_client_round)
    doc = {
        "paper": paper, "title": spec["title"], "budget": budget, "about": b["about"],
        "seeds": seeds, "resolve": b["resolve"], "overrides": b["overrides"] + (overrides or []),
        "interval": "95% percentile bootstrap over seeds, then test instances within each seed; "
                    "differences paired by seed and instance",
        "methods": {label: method_stats(s) for label, s in strata.items()},
        "claims": rows, "wall_s": time.perf_counter() - t0, "runs": str(out / "runs"),
    }
    atomic_write(out / "claims.json", json.dumps(doc, indent=2))
    write_claims_report(out, doc)
    return doc


def claim_cells(c: dict[str, Any]) -> tuple[str, str, str]:
    """(measured, difference, verdict text) for a table row."""
    if "difference" in c:
        measured = f"{c['a']} {fmt(c['a_value'])} vs {c['b']} {fmt(c['b_value'])}"
        diff = fmt(c["difference"])
    else:
        measured = f"{c['a_value']:,.0f} vs {c['b_value']:,.0f}"
        diff = f"{c['ratio']:.1f}x smaller"
    v = c["verdict"] + ("" if c["decided"] else " (budget too small to decide)")
    return measured, diff, v


def write_claims_report(out: Path, doc: dict[str, Any]) -> Path:
    from fedblend.reports.html import _page, _table

    parts = [(f"<p>{html.escape(doc['title'])}; budget <code>{doc['budget']}</code> "
             f"({html.escape(doc['about'])}); seeds {doc['seeds']}; wall {doc['wall_s']:.0f} s.</p>"),
             f"<p>Intervals: {html.escape(doc['interval'])}. ± = half-width of the 95% interval.</p>"]
    parts.append("<h2>Claims</h2>" + _table(
        ["claim", "metric", "measured", "a - b", "verdict", "note"],
        [[c["claim"], c["metric"], *claim_cells(c), c["note"]] for c in doc["claims"]],
    ))
    metrics = sorted({m for s in doc["methods"].values() for m in s if "[" not in m})
    parts.append("<h2>Methods</h2>" + _table(
        ["method", *metrics],
        [[label, *[fmt(s.get(m)) for m in metrics]] for label, s in doc["methods"].items()],
    ))
    parts.append('<p>Runs and their comparison: <a href="runs/report.html">runs/report.html</a></p>')
    path = out / "report.html"
    path.write_text(_page(f"fedblend reproduce {doc['paper']} ({doc['budget']})", parts))
    return path
