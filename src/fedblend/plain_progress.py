"""Plain progress lines for output that is not a terminal (CI, ``nohup``, a scheduler).

Rich progress bars draw nothing useful into a file, so a long run sent to a log printed
nothing until its table. When ``engine.progress`` is on and stdout is not a terminal, the
round loop prints one line per round instead (``[name seed 42] round 2/5: loss 1.234, 12.3 s``) and the run
says when it starts evaluating.
"""

from __future__ import annotations

import sys
from typing import Any


def plain(enabled: bool) -> bool:
    """True when progress is wanted but stdout is not a terminal."""
    return enabled and not sys.stdout.isatty()


def say(enabled: bool, line: str) -> None:
    if plain(enabled):
        print(line, flush=True)


def label(name: str, seed: int) -> str:
    """``name seed 42``: the seeds of one method (``--seeds N``) run under one name."""
    return f"{name} seed {seed}"


def round_line(name: str, record: dict[str, Any], total: int) -> str:
    """``[name] round 2/5: loss 1.234, 12.3 s`` (the name tells a comparison's runs apart)."""
    loss = record.get("loss")
    loss_s = f"loss {loss:.3f}" if isinstance(loss, int | float) else "no loss"
    return f"[{name}] round {record['round'] + 1}/{total}: {loss_s}, {record['seconds']:.1f} s"
