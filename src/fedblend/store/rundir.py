"""The run directory: resolved config, per-round metrics, checkpoints, summary, adapters.

Layout::

    DIR/config.toml        resolved config (loadable by ``fedblend run``)
    DIR/status.json        {"status": "running" | "failed" | "interrupted" | "complete", ...}
    DIR/metrics.jsonl      one JSON line per round
    DIR/checkpoint/        the server state and counters after the last checkpointed round
    DIR/clients/           each client's private state, versioned (store.clients.ClientStore);
                           a checkpoint's round names the version a resume reads
    DIR/adapters/          PEFT adapter directories (global once, local per client)
    DIR/eval/              predictions and per-instance weights
    DIR/summary.json       written last, atomically: its presence means the run completed
    DIR/report.html        ``fedblend report DIR``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tomli_w

from fedblend.comm.codec import State
from fedblend.errors import FedblendError
from fedblend.store.files import atomic_write, deferred_signals, load_state, save_state


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.path / "summary.json").is_file()

    def start(self, config: dict[str, Any], resume: bool) -> int:
        """Prepare the directory; returns the first round to run (0, or after a checkpoint)."""
        if self.complete and not resume:
            raise FedblendError(f"{self.path}: holds a completed run; choose another --out")
        ckpt = self.path / "checkpoint" / "state.json"
        if resume:
            if self.complete:
                raise FedblendError(f"{self.path}: run already complete; nothing to resume")
            if not ckpt.is_file():
                raise FedblendError(f"{self.path}: no checkpoint to resume from")
            saved = json.loads((self.path / "config.json").read_text())
            if _comparable(saved) != _comparable(config):
                raise FedblendError(
                    f"{self.path}: the config differs from the one this run started with"
                )
            done = json.loads(ckpt.read_text())["rounds_completed"]
            self._truncate_metrics(done)
            self.set_status("running", resumed_at_round=done)
            return done
        if self.path.exists() and any(self.path.iterdir()):
            if ckpt.is_file():
                raise FedblendError(
                    f"{self.path}: holds an unfinished run; pass --resume or choose another --out"
                )
            if (self.path / "status.json").is_file():
                shutil.rmtree(self.path)  # a failed run without checkpoint: start over
            else:
                raise FedblendError(f"{self.path}: directory is not empty and is not a fedblend run")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "config.json", json.dumps(config, indent=2))
        atomic_write(self.path / "config.toml", tomli_w.dumps(_toml_safe(config)))
        (self.path / "metrics.jsonl").write_text("")
        self.set_status("running")
        return 0

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
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

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
        ck = self.path / "checkpoint"
        with deferred_signals():  # a SIGTERM / Ctrl-C takes effect once all files of the round are written
            save_state(ck / "server.safetensors", server)
            for cid, st in clients.items():
                save_state(ck / "clients" / f"{cid}.safetensors", st)
            atomic_write(
                ck / "state.json",
                json.dumps({"rounds_completed": rounds_completed, "counters": counters}),
            )

    def load_checkpoint(self, client_ids) -> tuple[State, dict[int, State], dict[str, Any]]:
        ck = self.path / "checkpoint"
        server = load_state(ck / "server.safetensors")
        clients = {}
        for cid in client_ids:
            p = ck / "clients" / f"{cid}.safetensors"
            clients[cid] = load_state(p) if p.is_file() else {}
        counters = json.loads((ck / "state.json").read_text())["counters"]
        return server, clients, counters


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
