"""Run several algorithms on the same federation and seed; one table, ``compare.json``,
and an HTML report. Also the embedded default experiment (``fedblend demo``)."""

from __future__ import annotations

import html
import importlib.resources
import tomllib
from pathlib import Path
from typing import Any

from fedblend.config import ExperimentConfig, config_from_dict, load_config
from fedblend.experiment import run_experiment
from fedblend.reports.rundir import RunDir, atomic_write

SHARED_FLAN8 = Path("../shared/data/flan8")


def _row(label: str, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": label,
        "algorithm": summary["algorithm"],
        "run_dir": str(run_dir),
        "bytes_up": summary["comm"]["bytes_up"],
        "bytes_down": summary["comm"]["bytes_down"],
        "wall_s": summary["time"]["wall_s"],
        "train_s": summary["time"].get("train_s"),
        "eval_s": summary["time"].get("eval_s"),
        "generated": summary["time"].get("generated_instances"),
    }
    if "mean" in summary:
        row.update(P=summary["mean"]["P"], TTP=summary["mean"]["TTP"], metric=summary["metric"])
        if "mean_by_metric" in summary:
            row["by_metric"] = summary["mean_by_metric"]
    if "accuracy" in summary:
        acc = summary["accuracy"]
        row["accuracy"] = {k: v for k, v in acc.items() if k not in ("per_client", "reference")}
        ref = acc.get("reference") or {}  # vision: centralized reference rows, as columns
        row["accuracy"].update({f"ref {n}": ref.get(k) for k, n in (("linear_probe", "probe"), ("centralized_adapter", "adapter")) if ref})
    return row


def label_for(cfg: ExperimentConfig, taken: set[str]) -> str:
    label = cfg.algorithm
    if cfg.algorithm.startswith("feddpa"):
        label += f"[{cfg.eval.weighting}"
        label += f",{cfg.eval.weighting_convention}]" if cfg.eval.weighting == "dynamic" else "]"
    base, n = label, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def run_compare(configs: list[ExperimentConfig], out: Path, resume: bool = False) -> dict[str, Any]:
    """Run each config into ``out/<label>`` and write ``out/compare.json`` and ``report.html``."""
    out.mkdir(parents=True, exist_ok=True)
    rows, taken = [], set()
    for cfg in configs:
        label = label_for(cfg, taken)
        taken.add(label)
        run_dir = out / label
        rd = RunDir(run_dir)
        if rd.complete and resume:
            summary = rd.summary()
        else:
            summary = run_experiment(cfg, run_dir, resume=resume and (run_dir / "checkpoint").exists())
        rows.append(_row(label, summary, run_dir))
    result = {"runs": rows, "seed": configs[0].seed if configs else None}
    import json

    atomic_write(out / "compare.json", json.dumps(result, indent=2))
    write_compare_report(out, result)
    return result


def write_compare_report(out: Path, result: dict[str, Any]) -> Path:
    from fedblend.reports.html import _img, _page, _png, _table, plt

    rows = result["runs"]
    parts = []
    text_rows = [r for r in rows if "P" in r]
    if text_rows:
        parts.append("<h2>P and TTP</h2>" + _table(
            ["method", "metric", "mean P", "mean TTP", "bytes up", "bytes down", "wall s"],
            [[r["label"], r["metric"], r["P"], r["TTP"], r["bytes_up"], r["bytes_down"], r["wall_s"]]
             for r in text_rows],
        ))
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        x = range(len(text_rows))
        ax.bar([i - 0.2 for i in x], [r["P"] for r in text_rows], width=0.4, label="mean P")
        ax.bar([i + 0.2 for i in x], [r["TTP"] for r in text_rows], width=0.4, label="mean TTP")
        ax.set_xticks(list(x), [r["label"] for r in text_rows], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(text_rows[0]["metric"])
        ax.legend()
        parts.append(_img("mean P and TTP per method", _png(fig)))
    acc_rows = [r for r in rows if "accuracy" in r]
    if acc_rows:
        keys = list(acc_rows[0]["accuracy"])
        parts.append("<h2>Accuracy</h2>" + _table(
            ["method", *keys, "bytes up", "wall s"],
            [[r["label"], *[r["accuracy"].get(k) if r["accuracy"].get(k) is not None else "n/a" for k in keys],
              r["bytes_up"], r["wall_s"]] for r in acc_rows],
        ))
    links = "".join(
        f'<li><a href="{html.escape(Path(r["run_dir"]).name)}/report.html">{html.escape(r["label"])}</a></li>'
        for r in rows
    )
    parts.append(f"<h2>Runs</h2><ul>{links}</ul>")
    path = out / "report.html"
    path.write_text(_page("fedblend comparison", parts))
    return path


def demo_configs(overrides: list[str]) -> list[ExperimentConfig]:
    """The embedded default: ``local`` vs ``fedit`` on a small flan8 federation with SmolLM2
    (or the built-in synthetic tasks when ``../shared/data/flan8`` is absent)."""
    text = importlib.resources.files("fedblend.resources").joinpath("demo.toml").read_text()
    raw = tomllib.loads(text)
    if not SHARED_FLAN8.is_dir():
        raw["data"] = {"kind": "synthetic", "num_clients": 4, "synthetic_train_per_client": 16,
                       "synthetic_test_per_task": 8}
    return [
        config_from_dict({**raw, "algorithm": algo, "name": f"demo-{algo}"}, overrides, source="demo")
        for algo in ("local", "fedit")
    ]


def load_configs(paths: list[Path], overrides: list[str]) -> list[ExperimentConfig]:
    return [load_config(p, overrides) for p in paths]
