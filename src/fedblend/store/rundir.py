"""The run directory: resolved config, per-round metrics, checkpoints, summary, adapters.

Layout::

    DIR/config.toml        resolved config (loadable by ``fedblend run``)
    DIR/status.json        {"status": "running" | "failed" | "interrupted" | "complete", ...}
    DIR/metrics.jsonl      one JSON line per round
    DIR/checkpoint/        state.json: the last checkpointed round, its counters and the version
                           directory holding its server state (v<round>/server.safetensors); a
                           versioned set whose pointer (state.json) moves last, so a SIGKILL
                           cannot tear it
    DIR/clients/           each client's private state, versioned (store.clients.ClientStore);
                           a resume reads each client's newest version at or before the
                           checkpoint's round
    DIR/adapters/          PEFT adapter directories (global once, local per client)
    DIR/eval/              predictions and per-instance weights
    DIR/summary.json       written last, atomically: its presence means the run completed
    DIR/report.html        ``fedblend report DIR``
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from fedblend.comm.codec import State
from fedblend.errors import FedblendError
from fedblend.store.files import (
    atomic_write,
    commit_version,
    deferred_signals,
    load_state,
    read_version,
    remove_temps,
    save_state,
)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.note: str | None = None  # set by start(): a resume that had to start over

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.path / "summary.json").is_file()

    def start(self, config: dict[str, Any], resume: bool) -> int:
        """Prepare the directory; returns the first round to run (0, or after a checkpoint).
        ``resume`` of a run stopped before its first checkpoint (or never started) starts it
        from round 0 and leaves a one-line ``note`` saying so."""
        self.note: str | None = None
        if self.complete and not resume:
            raise FedblendError(f"{self.path}: holds a completed run; choose another --out")
        ckpt = self.path / "checkpoint" / "state.json"
        if resume:
            self.note = self.resume_note()
            if ckpt.is_file():
                saved = json.loads((self.path / "config.json").read_text())
                if _comparable(saved) != _comparable(config):
                    raise FedblendError(
                        f"{self.path}: the config differs from the one this run started with"
                    )
                done = json.loads(ckpt.read_text())["rounds_completed"]
                remove_temps(self.path)  # left by writes a kill cut short
                self._truncate_metrics(done)
                self.set_status("running", resumed_at_round=done)
                return done
        if self._has_files():
            if ckpt.is_file():
                raise FedblendError(
                    f"{self.path}: holds an unfinished run; pass --resume or choose another --out"
                )
            if self._is_run():
                shutil.rmtree(self.path)  # a failed or killed run without checkpoint: start over
            else:
                raise FedblendError(f"{self.path}: directory is not empty and is not a fedblend run")
        self.create()
        self.set_status("running")  # first: a run killed at any later instant is recognised as one
        atomic_write(self.path / "config.json", json.dumps(config, indent=2))
        atomic_write(self.path / "config.toml", tomli_w.dumps(_toml_safe(config)))
        (self.path / "metrics.jsonl").write_text("")
        return 0

    def resume_note(self) -> str | None:
        """What a resume of this directory will do, decided before anything is written: a
        completed run is an error; a run stopped before its first checkpoint (or never started)
        starts from round 0, and the returned note says so; ``None``: it continues from its
        checkpoint (or, holding something other than a run, is refused by :meth:`start`)."""
        if self.complete:
            raise FedblendError(f"{self.path}: run already complete; nothing to resume")
        if (self.path / "checkpoint" / "state.json").is_file():
            return None
        if self._is_run() or not self._has_files():
            return f"{self.path}: no checkpoint yet (stopped before its first); starting from round 0"
        return None

    def _has_files(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def _is_run(self) -> bool:
        return (self.path / "status.json").is_file() or (self.path / "config.json").is_file()

    def create(self) -> None:
        create_dir(self.path)

    def set_status(self, status: str, **extra: Any) -> None:
        atomic_write(self.path / "status.json", json.dumps({"status": status, **extra}, indent=2))

    def fail(self, error: BaseException) -> None:
        if not self.path.is_dir() or self.complete:
            return  # once summary.json is written the run is complete, whatever arrives after
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (fedblend.signals)
            ckpt = self.path / "checkpoint" / "state.json"
            done = json.loads(ckpt.read_text())["rounds_completed"] if ckpt.is_file() else 0
            self.set_status("interrupted", rounds_completed=done)
            return
        self.set_status("failed", error=f"{error.__class__.__name__}: {error}")

    # -- records ---------------------------------------------------------------------------
    def log_round(self, record: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rounds(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
                # a last line cut short (power loss while appending): that round is not in
                # the checkpoint either, and a resume runs it again
        return out

    def _truncate_metrics(self, rounds_completed: int) -> None:
        kept = [r for r in self.rounds() if r.get("round", 0) < rounds_completed]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def write_json(self, rel: str, obj: Any) -> None:
        atomic_write(self.path / rel, json.dumps(obj, indent=2))

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)
        self.set_status("complete")

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(
        self, rounds_completed: int, server: State, clients: dict[int, State], counters: dict[str, Any]
    ) -> None:
        """Write the round's server and client states as a new version, then move the pointer
        (``checkpoint/state.json``) to it, then delete the older version (commit_version): a
        SIGKILL or power loss at any instant leaves the old checkpoint or the new one whole."""
        ck = self.path / "checkpoint"

        def write(d: Path) -> None:
            save_state(d / "server.safetensors", server)
            for cid, st in clients.items():
                save_state(d / "clients" / f"{cid}.safetensors", st)

        with deferred_signals():  # a SIGTERM / Ctrl-C takes effect once the set is committed
            commit_version(ck, rounds_completed, write,
                           {"rounds_completed": rounds_completed, "counters": counters})
            for legacy in (ck / "server.safetensors", ck / "clients"):  # unversioned layout
                if legacy.is_dir():
                    shutil.rmtree(legacy)
                elif legacy.exists():
                    legacy.unlink()

    def checkpoint_dir(self) -> Path | None:
        """The directory of the checkpoint ``state.json`` names (None without a checkpoint)."""
        found = read_version(self.path / "checkpoint")
        return found[0] if found else None

    def load_checkpoint(self, client_ids) -> tuple[State, dict[int, State], dict[str, Any]]:
        """The states and counters of the checkpoint ``state.json`` names, and nothing else."""
        found = read_version(self.path / "checkpoint")
        if found is None:
            raise FedblendError(f"{self.path}: no checkpoint (checkpoint/state.json)")
        d, pointer = found
        server = load_state(d / "server.safetensors")
        clients = {}
        for cid in client_ids:
            p = d / "clients" / f"{cid}.safetensors"
            clients[cid] = load_state(p) if p.is_file() else {}
        return server, clients, pointer["counters"]


def create_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as a writable directory, or raise a one-line error
    naming it (under a file, read-only, ...); on failure the directories this call made are
    removed again."""
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise FedblendError(f"--out {path}: cannot create a run directory there ({e.strerror or e})") from None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    c = json.loads(json.dumps(config))
    c.get("engine", {}).pop("progress", None)
    c.get("engine", {}).pop("threads", None)
    return c


def _toml_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _toml_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_toml_safe(v) for v in obj]
    return obj
