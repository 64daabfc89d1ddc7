"""Crash-safe files of the run store: whole-file atomic writes, role-grouped tensor states as
safetensors, and holding SIGTERM / SIGINT back while the files of one checkpoint are written."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedblend.comm.codec import SEP, State


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _flatten(state: State) -> dict[str, torch.Tensor]:
    return {f"{role}{SEP}{k}": t.contiguous() for role, ts in state.items() for k, t in ts.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> State:
    out: State = {}
    for name, t in flat.items():
        role, k = name.split(SEP, 1)
        out.setdefault(role, {})[k] = t
    return out


def save_state(path: Path, state: State, meta: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_flatten(state), str(tmp), metadata=meta or None)
    os.replace(tmp, path)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while the block runs (writing the files of one checkpoint),
    then deliver them: an interrupt between two of its files left a server state one round
    ahead of the ``state.json`` that names its round, and a resume trained that round twice.
    A no-op outside the main thread, where Python delivers no signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def load_state(path: Path) -> State:
    return _unflatten(load_file(str(path)))
