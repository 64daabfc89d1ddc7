"""Re-score one finished run under a list of inference settings (``fedblend evaluate --sweep``).

FedDPA's weighting ablations (``feddpa.weighting``, ``feddpa.dynamic_lambda``,
``feddpa.dynamic_top_k``, ``feddpa.static_weight``) change inference only, so they are evaluated
from the states one trained run left behind: no retraining, the same adapters for every
setting. Each ``--sweep key=v1,v2,...`` is one axis; several axes form a grid. Every setting
is written as a sub-run ``OUT/<setting>`` (a normal run directory, via
:func:`fedblend.runner.evaluate_run`) and the table as ``OUT/sweep.json``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from fedblend.config import config_from_dict, is_inference_setting, parse_override
from fedblend.errors import ConfigError, FedblendError
from fedblend.store.files import atomic_write
from fedblend.store.rundir import RunDir


def parse_sweep(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["feddpa.dynamic_lambda=0.3,0.5"]`` -> ``[("feddpa.dynamic_lambda", ["0.3", "0.5"])]``."""
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ConfigError(f"--sweep {item!r}: expected section.key=value1,value2,...")
        if not is_inference_setting(key.strip()):
            raise ConfigError(f"--sweep {item}: only settings that change inference only (eval.*, and an "
                              "algorithm's own such as feddpa.weighting) can be swept from one trained run")
        parse_override(f"{key}={values[0]}")  # the key's shape is checked like --set's
        axes.append((key.strip(), values))
    return axes


def settings(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of the axes' values, as ``--set`` override lists."""
    keys = [k for k, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(vals for _, vals in axes))]


def setting_label(setting: list[str]) -> str:
    return ",".join(s.split(".", 1)[1] for s in setting)


def _dir_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", label)


def run_sweep(source: str | Path, overrides: list[str], sweep: list[str], out: str | Path) -> dict[str, Any]:
    """Evaluate the finished run ``source`` once per setting; returns (and writes) the table."""
    from fedblend.runner import evaluate_run

    src, out = RunDir(source), Path(out)
    if not src.complete:
        raise FedblendError(f"{src.path}: not a completed run")
    grid = settings(parse_sweep(sweep))
    for setting in grid:  # refuse a bad value before any (slow) evaluation starts
        try:
            config_from_dict(src.config(), overrides + setting, source=str(src.path / "config.json"))
        except ConfigError as e:
            msg = str(e)
            swept = any(msg.startswith(f"--set {item}:") for item in setting)
            raise ConfigError(msg.replace("--set", "--sweep", 1) if swept else msg) from None
    rows = []
    for setting in grid:
        label = setting_label(setting)
        sub = out / _dir_name(label)
        done = RunDir(sub)  # a re-run of the same sweep reuses the settings it already scored
        reused = done.complete and done.summary().get("evaluated_from") == str(src.path)
        summary = done.summary() if reused else evaluate_run(src.path, overrides + setting, sub)
        row: dict[str, Any] = {
            "label": label, "overrides": setting, "run_dir": str(sub), "reused": reused,
            "eval_s": summary["time"].get("eval_s"),
        }
        if "mean" in summary:
            row.update(P=summary["mean"]["P"], TTP=summary["mean"]["TTP"], metric=summary["metric"])
        if summary.get("instance_weights"):
            row["instance_weights"] = summary["instance_weights"]
        rows.append(row)
    result = {"source": str(src.path), "algorithm": src.config().get("algorithm"),
              "overrides": overrides, "sweep": sweep, "rows": rows}
    atomic_write(out / "sweep.json", json.dumps(result, indent=2))
    return result
