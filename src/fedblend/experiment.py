"""Run or re-evaluate one experiment (text or vision) on the in-process engine.

The flow itself is :mod:`fedblend.runner` (one runner for both modalities, see
:mod:`fedblend.modalities`); this module is the entry point the CLI, ``compare`` and the
benchmarks call.
"""

from __future__ import annotations

from fedblend.engines.inprocess import run_experiment
from fedblend.runner import evaluate_run

__all__ = ["evaluate_run", "run_experiment"]
