"""Crash-safe files of the run store: whole-file atomic writes, role-grouped tensor states as
safetensors, versioned sets of files behind one pointer (:func:`commit_version`), and holding
SIGTERM / SIGINT back while the files of one checkpoint are written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedblend.comm.codec import SEP, State


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to the disk (a directory: its names, so that a
    rename into it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader (or a process killed at any
    instant) sees the old file or the new one, never a part. ``durable``: also fsync the file
    before the rename and the directory after it, so the new content survives a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(path.parent)


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


def load_state(path: Path) -> State:
    return _unflatten(load_file(str(path)))


_TEMP = re.compile(r"\..+\.tmp(-\w+)?")  # what atomic_write and save_state write before the rename


def remove_temps(root: Path) -> int:
    """Delete the temporaries that atomic_write / save_state leave when killed before their
    rename (``.<name>.tmp``, ``.<name>.tmp-<random>``) anywhere under ``root``; returns how
    many. Only for directories this store owns, and while no writer is running."""
    n = 0
    for p in root.rglob(".*"):
        if p.is_file() and _TEMP.fullmatch(p.name):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ---- versioned sets of files ---------------------------------------------------------------
POINTER = "state.json"
_VERSION = re.compile(r"v(\d+)(?:-(\d+))?")
_TMP_PREFIX = ".tmp-"


def commit_version(root: Path, number: int, write: Callable[[Path], None], pointer: dict[str, Any],
                   pointer_name: str = POINTER) -> Path:
    """Replace a *set* of files (a checkpoint: server state, client states, counters) so that a
    SIGKILL or a power loss at any instant leaves one complete set, old or new, never a mix.

    The rule, for every store that keeps such a set:

    1. ``write(d)`` writes the whole new set into a fresh hidden directory ``root/.tmp-...``;
       every file in it and the directory are fsynced, and it is renamed to ``root/v<number>``
       (``v<number>-<k>`` if the pointer already names ``v<number>``);
    2. only then the pointer ``root/<pointer_name>`` (JSON: ``pointer`` plus
       ``{"version": "v<number>"}``) is replaced atomically and fsynced; from that rename on,
       readers see the new set;
    3. then every other version directory (and any temporary left by a killed writer, of a
       version or of the pointer) under ``root`` is deleted.

    Killed before 2, the pointer still names the old, complete set (the new directory is
    garbage and goes at the next commit); killed after 2, the new one. Readers open only what
    the pointer names (:func:`read_version`), never "the newest directory". ``root`` holds
    nothing else that matches ``v<n>`` or ``.tmp-*``. Returns the new version directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    current = read_version(root, pointer_name)
    name = f"v{number}"
    if current is not None and current[0].name == name:
        k = 1
        while (root / f"{name}-{k}").exists():
            k += 1
        name = f"{name}-{k}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TMP_PREFIX}{name}-"))
    try:
        write(tmp)
        _fsync_tree(tmp)
        target = root / name
        if target.exists():  # written by a writer killed before it moved the pointer
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(root)
    atomic_write(root / pointer_name, json.dumps({**pointer, "version": name}), durable=True)
    for p in root.iterdir():
        if p.name != name and p.is_dir() and (_VERSION.fullmatch(p.name) or p.name.startswith(_TMP_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.startswith(f".{pointer_name}.tmp-"):  # a killed pointer write
            p.unlink(missing_ok=True)
    return target


def read_version(root: Path, pointer_name: str = POINTER) -> tuple[Path, dict[str, Any]] | None:
    """The directory the pointer names and the pointer's content; None without a pointer. A
    pointer without ``version`` (written before versioned sets) names ``root`` itself."""
    p = root / pointer_name
    if not p.is_file():
        return None
    ptr = json.loads(p.read_text())
    return (root / ptr["version"] if "version" in ptr else root), ptr


def _fsync_tree(d: Path) -> None:
    for dirpath, _, files in os.walk(d, topdown=False):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while the block runs (writing the files of one checkpoint),
    then deliver them, so that a SIGTERM does not throw away a checkpoint half-written (the
    versioned set keeps the previous one consistent either way; see :func:`commit_version`).
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
