"""SIGTERM (what a batch scheduler sends on preemption) and Ctrl-C during ``fedblend run``:
the run directory's status.json becomes ``interrupted`` with the last checkpointed round and
the exact command that resumes it, which is also printed on stderr."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    exit_code = 143


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` (a KeyboardInterrupt) while the block runs."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(argv: Sequence[str], out_dir: Path) -> str:
    """``fedblend`` plus the same arguments, with ``--out`` made explicit and ``--resume``."""
    args = [a for a in argv if a != "--resume"]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out_dir)]
    return shlex.join(["fedblend", *args, "--resume"])


def record_interrupt(out_dir: Path, argv: Sequence[str], reason: str) -> str | None:
    """Add the resume command to an ``interrupted`` status.json; returns the stderr hint."""
    status_path = out_dir / "status.json"
    if not status_path.is_file():
        return None
    from fedblend.store.files import atomic_write

    status = json.loads(status_path.read_text())
    if status.get("status") != "interrupted":
        return None
    cmd = resume_command(argv, out_dir)
    status.update(reason=reason, resume=cmd)
    atomic_write(status_path, json.dumps(status, indent=2))
    done = status.get("rounds_completed", 0)
    if not done:
        return f"interrupted ({reason}) before the first checkpoint; run the same command again"
    return f"interrupted ({reason}) after round {done}; continue with:\n  {cmd}"
