"""Run or re-evaluate one experiment (text or vision) on the in-process engine.

The flow itself is :mod:`fedblend.runner` (one runner for both modalities, see
:mod:`fedblend.modalities`); this module is the entry point the CLI, ``compare`` and the
benchmarks call. Third-party warnings and logs go to the run's ``run.log``, not the terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedblend.config import ExperimentConfig
from fedblend.engines import inprocess
from fedblend.rounds import Tap
from fedblend.runlog import third_party_to
from fedblend.runner import evaluate_run as _evaluate_run

__all__ = ["evaluate_run", "run_experiment"]


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, resume: bool = False, tap: Tap | None = None
) -> dict[str, Any]:
    """Run ``cfg`` and return its summary; a failed run leaves no summary.json."""
    with third_party_to(Path(out) / "run.log"):
        return inprocess.run_experiment(cfg, out, resume=resume, tap=tap)


def evaluate_run(source: str | Path, overrides: list[str], out: str | Path) -> dict[str, Any]:
    """Re-evaluate a completed run with other ``eval.*`` settings from the states its clients
    held after training; writes a new run directory."""
    with third_party_to(Path(out) / "run.log"):
        return _evaluate_run(source, overrides, out)
