"""SIGTERM (what a batch scheduler sends on preemption) and Ctrl-C during ``fedblend run``:
the run directory's status.json becomes ``interrupted`` with the last checkpointed round and
the exact command that resumes it, which is also printed on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    exit_code = 143


EXIT_WITHIN_S = 4.0
"""After SIGTERM the process unwinds (status.json, the resume hint); if that has not ended it
by then, it exits anyway with 143: a scheduler's grace period is often a few seconds."""


def _watch(fd: int, left: threading.Event) -> None:
    """Block on the signal wakeup pipe; on SIGTERM give the main thread EXIT_WITHIN_S seconds
    to leave the interruptible block, else end the process. Python runs a signal's handler
    only when the main thread next executes bytecode, which a long call in native code (a
    generation step, a huge JSON dump) delays: this thread hears the signal at once, from the
    C-level handler's write."""
    try:
        while True:
            data = os.read(fd, 64)
            if not data:
                return
            if signal.SIGTERM in data and not left.wait(EXIT_WITHIN_S):
                os._exit(143)
    except OSError:
        return
    finally:
        os.close(fd)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` (a KeyboardInterrupt) while the block runs; the
    process then ends within :data:`EXIT_WITHIN_S` seconds (plus a scheduling slice) whatever
    it is doing."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no signals here anyway
        old_fd = None
    left = threading.Event()
    threading.Thread(target=_watch, args=(r, left), daemon=True, name="fedblend-sigterm").start()
    try:
        yield
    finally:
        left.set()
        signal.signal(signal.SIGTERM, previous)
        if old_fd is not None:
            signal.set_wakeup_fd(old_fd)
        os.close(w)  # the watcher reads EOF and ends


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
