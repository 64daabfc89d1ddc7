"""Run several algorithms on the same federation and seed; one table, ``compare.json``,
and an HTML report. Also the embedded default experiment (``fedblend demo``)."""

from __future__ import annotations

import html
import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import Any

from fedblend.config import ExperimentConfig, config_from_dict, load_config
from fedblend.console import fmt_bytes
from fedblend.runner import run_experiment
from fedblend.store.files import atomic_write
from fedblend.store.rundir import RunDir

SHARED_FLAN8 = Path("../shared/data/flan8")
DEMO_METHODS = ("local", "fedit", "feddpa_f")
DEMO_SEEDS = 2


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
    from fedblend.algorithms import algorithm_class

    label = algorithm_class(cfg.algorithm).label(cfg)
    base, n = label, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def dir_name(label: str, taken: set[str] | None = None) -> str:
    """A run directory name for a method label that is safe in a shell: letters, digits, ``_``,
    ``-`` and ``.`` only (``feddpa_f[dynamic,intent]`` -> ``feddpa_f-dynamic-intent``); the label
    itself stays in the records (``compare.json``'s ``label``). Unique among ``taken``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "run"
    base, n = name, 2
    while taken is not None and name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def seed_list(base: int, n: int) -> list[int]:
    """The seeds of an ``n``-seed run: ``base, base+1, ...`` (the same for every method)."""
    return [base + i for i in range(n)]


def run_seeds(
    cfg: ExperimentConfig, out: Path, seeds: list[int] | None, resume: bool = False
) -> list[tuple[Path, dict[str, Any]]]:
    """Run ``cfg`` into ``out`` (no seeds) or once per seed into ``out/seed_<s>``; every random
    choice (federation subsample, initialisation, data order) follows ``cfg.seed``."""
    done = []
    for s in seeds if seeds is not None else [None]:
        run_dir = out if s is None else out / f"seed_{s}"
        c = cfg if s is None else cfg.model_copy(update={"seed": s})
        rd = RunDir(run_dir)
        if rd.complete and resume:
            summary = rd.summary()
        else:
            summary = run_experiment(c, run_dir, resume=resume and (run_dir / "checkpoint").exists())
        done.append((run_dir, summary))
    return done


def _mean_row(label: str, runs: list[tuple[Path, dict[str, Any]]], out: Path) -> dict[str, Any]:
    """One table row per method: the point values are means over its seeds."""
    rows = [_row(label, s, d) for d, s in runs]
    row = dict(rows[0])
    for k in ("P", "TTP", "bytes_up", "bytes_down", "wall_s", "train_s", "eval_s"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals and k in row:
            row[k] = sum(vals) / len(vals)
    if "accuracy" in row:
        row["accuracy"] = {
            k: (sum(r["accuracy"][k] for r in rows) / len(rows)
                if all(r["accuracy"].get(k) is not None for r in rows) else None)
            for k in row["accuracy"]
        }
    if len(runs) > 1 or runs[0][0] != out:
        row["run_dir"] = str(out)
        row["seeds"] = [s["seed"] for _, s in runs]
        row["run_dirs"] = [str(d) for d, _ in runs]
    return row


def interval_stats(runs: dict[str, list[tuple[Path, dict[str, Any]]]]) -> dict[str, Any]:
    """compare.json's ``stats``: intervals per method and metric, paired differences per pair."""
    from fedblend.errors import FedblendError
    from fedblend.evidence import compare_stats, run_strata

    try:
        strata = {label: [run_strata(d) for d, _ in rs] for label, rs in runs.items()}
    except FedblendError as e:
        return {"error": str(e)}
    return compare_stats(strata)


def run_compare(
    configs: list[ExperimentConfig], out: Path, resume: bool = False, seeds: list[int] | None = None,
    flat: bool = False, labels: list[str] | None = None, data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run each config into ``out/<label>`` (or ``out/<label>/seed_<s>`` per seed) and write
    ``out/compare.json`` and ``report.html``, with bootstrap intervals over seeds and test
    instances and paired differences between methods. ``flat`` (one config): its seed
    directories go straight under ``out`` (``fedblend run --seeds``). ``data``: what the
    comparison ran on (:func:`demo_data`), recorded in ``compare.json`` and the report."""
    out.mkdir(parents=True, exist_ok=True)
    rows, taken, dirs = [], set(), set()
    runs: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for i, cfg in enumerate(configs):
        label = labels[i] if labels else label_for(cfg, taken)
        taken.add(label)
        name = dir_name(label, dirs)
        dirs.add(name)
        base = out if flat and len(configs) == 1 and seeds is not None else out / name
        runs[label] = run_seeds(cfg, base, seeds, resume)
        rows.append(_mean_row(label, runs[label], base))
    result = {
        "runs": rows,
        "seed": configs[0].seed if configs else None,
        "seeds": seeds or ([configs[0].seed] if configs else []),
        "stats": interval_stats(runs),
    }
    if data is not None:
        result["data"] = data
    import json

    atomic_write(out / "compare.json", json.dumps(result, indent=2))
    write_compare_report(out, result)
    return result


def _err(st: dict[str, Any] | None, key: str) -> list[float]:
    """Asymmetric error bar [below, above] around the mean from a stats cell."""
    c = (st or {}).get(key)
    return [c["mean"] - c["lo"], c["hi"] - c["mean"]] if c else [0.0, 0.0]


def interval_note(result: dict[str, Any]) -> str:
    n = len(result.get("seeds") or [])
    src = ("test instances only (1 seed)" if n <= 1
           else f"{n} seeds (resampled), then test instances within each seed")
    return f"± = half-width of the 95% bootstrap interval over {src}"


def write_compare_report(out: Path, result: dict[str, Any]) -> Path:
    from fedblend.reports.html import _img, _page, _png, _table, fmt_seconds, plt
    from fedblend.stats import fmt

    rows = result["runs"]
    stats = result.get("stats") or {}
    per = stats.get("methods", {})
    parts = []
    data = result.get("data")
    if data:
        parts.append("<p>" + "<br>".join(html.escape(line.strip()) for line in data_notice(data)) + "</p>")
    parts.append(f"<p>seeds {result.get('seeds')}; {html.escape(interval_note(result))}</p>")
    text_rows = [r for r in rows if "P" in r]
    if text_rows:
        parts.append("<h2>P and TTP</h2>" + _table(
            ["method", "metric", "mean P", "mean TTP", "bytes up", "bytes down", "wall s"],
            [[r["label"], r["metric"], fmt(per.get(r["label"], {}).get("P")) if per else r["P"],
              fmt(per.get(r["label"], {}).get("TTP")) if per else r["TTP"],
              fmt_bytes(r["bytes_up"]), fmt_bytes(r["bytes_down"]), fmt_seconds(r["wall_s"])]
             for r in text_rows],
        ))
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        x = range(len(text_rows))
        for off, key, name in ((-0.2, "P", "mean P"), (0.2, "TTP", "mean TTP")):
            errs = [_err(per.get(r["label"]), key) for r in text_rows]
            ax.bar([i + off for i in x], [r[key] for r in text_rows], width=0.4, label=name,
                   yerr=[[e[0] for e in errs], [e[1] for e in errs]], capsize=3)
        ax.set_xticks(list(x), [r["label"] for r in text_rows], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(text_rows[0]["metric"])
        ax.set_ylim(bottom=0)  # scores are in [0, 1]
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, not on them
        parts.append(_img("mean P and TTP per method (error bars: 95% interval)", _png(fig)))
    acc_rows = [r for r in rows if "accuracy" in r]
    if acc_rows:
        keys = list(acc_rows[0]["accuracy"])
        parts.append("<h2>Accuracy</h2>" + _table(
            ["method", *keys, "bytes up", "wall s"],
            [[r["label"], *[r["accuracy"].get(k) if r["accuracy"].get(k) is not None else "n/a" for k in keys],
              fmt_bytes(r["bytes_up"]), fmt_seconds(r["wall_s"])] for r in acc_rows],
        ))
        if per:
            mets = ["accuracy", "tail accuracy"]
            parts.append(_table(["method", *[f"{m} (95% interval)" for m in mets]],
                                [[r["label"], *[fmt(per.get(r["label"], {}).get(m)) for m in mets]]
                                 for r in acc_rows]))
            fig, ax = plt.subplots(figsize=(6.5, 3.4))
            x = range(len(acc_rows))
            for off, key in ((-0.2, "accuracy"), (0.2, "tail accuracy")):
                cells = [per.get(r["label"], {}).get(key) for r in acc_rows]
                errs = [_err(per.get(r["label"]), key) for r in acc_rows]
                ax.bar([i + off for i in x], [c["mean"] if c else 0.0 for c in cells], width=0.4,
                       label=key, yerr=[[e[0] for e in errs], [e[1] for e in errs]], capsize=3)
            ax.set_xticks(list(x), [r["label"] for r in acc_rows], rotation=20, ha="right", fontsize=7)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, not on them
            parts.append(_img("accuracy per method (error bars: 95% interval)", _png(fig)))
    if stats.get("pairs"):
        parts.append("<h2>Paired differences (a - b)</h2>" + _table(
            ["a", "b", "metric", "difference (95% interval)", "significant"],
            [[p["a"], p["b"], p["metric"], fmt(p["diff"]), "yes" if p["diff"]["significant"] else "no"]
             for p in stats["pairs"]],
        ))
    if stats.get("error"):
        parts.append(f"<p>no intervals: {html.escape(stats['error'])}</p>")
    links = "".join(
        f'<li><a href="{html.escape(Path(d).relative_to(out).as_posix())}/report.html">'
        f'{html.escape(r["label"])}{" seed " + d.rsplit("_", 1)[-1] if "run_dirs" in r else ""}</a></li>'
        for r in rows for d in r.get("run_dirs", [r["run_dir"]])
    )
    parts.append(f"<h2>Runs</h2><ul>{links}</ul>")
    path = out / "report.html"
    path.write_text(_page("fedblend comparison", parts))
    return path


FLAN8_SOURCE = "the data/dataset1 folder of FedDPA's repository (github.com/Lydia-yang/FedDPA)"
DEMO_MINUTES_PER_SEED = {"flan8": 6.0, "synthetic": 1.8}
"""Measured wall minutes of one demo seed (all three methods) on 2 idle CPU cores (AMD EPYC):
flan8 12.1 min for 2 seeds (2026-11-23), synthetic 3 min 37 s for 2 seeds (2026-12-05)."""


def demo_configs(overrides: list[str], data_dir: Path | None = None) -> list[ExperimentConfig]:
    """The embedded default: ``local`` vs ``fedit`` vs ``feddpa_f`` on four flan8 clients with
    SmolLM2 (flan8 from ``data_dir``, else ``../shared/data/flan8``; the built-in synthetic
    tasks when neither exists)."""
    text = importlib.resources.files("fedblend.resources").joinpath("demo.toml").read_text()
    raw = tomllib.loads(text)
    flan8 = data_dir if data_dir is not None else SHARED_FLAN8
    if data_dir is not None and not (data_dir / "test.jsonl").is_file():
        from fedblend.errors import ConfigError

        raise ConfigError(f"--data {data_dir}: not a flan8 folder (no test.jsonl; expected "
                          "local_training_<client>.json and test.jsonl)")
    if flan8.is_dir():
        raw["data"]["dir"] = str(flan8)
    else:
        raw["data"] = {"kind": "synthetic", "num_clients": 4, "synthetic_train_per_client": 16,
                       "synthetic_test_per_task": 8}
    return [
        config_from_dict({**raw, "algorithm": algo, "name": f"demo-{algo}"}, overrides, source="demo")
        for algo in DEMO_METHODS
    ]


def demo_data(cfg: ExperimentConfig, n_seeds: int, overridden: bool = False) -> dict[str, Any]:
    """What the demo runs on, for the notice printed before it starts, ``compare.json`` and the
    report: the data (flan8 or the built-in synthetic tasks), its size, where flan8 comes from
    and the expected time."""
    synthetic = cfg.data.kind == "synthetic"
    kind = "synthetic" if synthetic else "flan8"
    if synthetic:
        clients = cfg.data.num_clients
        size = (f"{clients} clients, one task each, {cfg.data.synthetic_train_per_client} training "
                f"examples per client, {cfg.data.synthetic_test_per_task} test examples per task")
        where = (f"flan8 was not found at {SHARED_FLAN8}; to run on FedDPA's flan8 tasks, get "
                 f"{FLAN8_SOURCE} and pass --data DIR")
        dir_ = None
    else:
        clients = len(cfg.data.clients) or cfg.data.num_clients
        size = (f"{clients} flan8 clients ({', '.join(map(str, cfg.data.clients))}), one FLAN task each, "
                f"{cfg.data.max_train_per_client} training examples per client, "
                f"{cfg.eval.max_per_task} test examples per task")
        dir_ = str(Path(cfg.data.dir).expanduser().resolve())
        where = f"from {dir_}"
    minutes = DEMO_MINUTES_PER_SEED[kind] * n_seeds
    return {
        "kind": kind, "dir": dir_, "description": size, "where": where,
        "model": "SmolLM2-135M-Instruct (offline)" if cfg.model.source == "smollm2" else cfg.model.source,
        "seeds": n_seeds, "expected_minutes": round(minutes, 1),
        "expected": f"about {minutes:.0f} min on 2 idle CPU cores (measured), less on more cores"
        + ("; measured at the demo's defaults, which --set changed" if overridden else ""),
    }


def data_notice(data: dict[str, Any]) -> list[str]:
    """The lines that say what a demo runs on, before it starts."""
    name = "built-in synthetic tasks" if data["kind"] == "synthetic" else "flan8"
    return [
        f"data: {name}: {data['description']}",
        f"      {data['where']}",
        f"model: {data['model']}; {data['seeds']} seed(s); expected time: {data['expected']}",
    ]


def load_configs(paths: list[Path], overrides: list[str]) -> list[ExperimentConfig]:
    return [load_config(p, overrides) for p in paths]
