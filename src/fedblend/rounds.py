"""The server side of every engine: the round loop (select, configure, dispatch, aggregate,
log, checkpoint) and the transport that encodes and counts every message.

Engines call :func:`run_round_loop` with their own ``dispatch`` (in-process: ``local_update``
here; Flower: a message to each SuperNode), so the loop is written once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedblend.algorithms.base import Algorithm, State
from fedblend.comm.codec import Message, decode, encode
from fedblend.config import ExperimentConfig
from fedblend.device import system_info
from fedblend.plain_progress import label, round_line, say
from fedblend.store.clients import ClientStore
from fedblend.store.rundir import RunDir
from fedblend.trust import round_record, screen_updates, skip_reason

Tap = Callable[[str, int, int, bytes], None]  # (direction, round, client id, wire bytes)


class ProtocolViolation(RuntimeError):
    """A client tried to send a role its algorithm does not declare shared."""


@dataclass
class Transport:
    """Encodes every message, counts its bytes, hands the receiver a decoded copy."""

    tap: Tap | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    per_round: dict[int, dict[str, int]] = field(default_factory=dict)

    def _count(self, direction: str, rnd: int, n: int) -> None:
        slot = self.per_round.setdefault(rnd, {"up": 0, "down": 0})
        slot[direction] += n
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n

    def encode_down(self, rnd: int, cid: int, msg: Message) -> bytes:
        """The wire bytes of a server -> client message, counted (and tapped)."""
        data = encode(msg)
        self.sent_down(rnd, cid, data)
        return data

    def sent_down(self, rnd: int, cid: int, data: bytes) -> None:
        """Count (and tap) the wire bytes of a server -> client message already encoded (the
        same bytes sent to many clients are encoded once)."""
        self._count("down", rnd, len(data))
        if self.tap:
            self.tap("down", rnd, cid, data)

    def decode_up(self, rnd: int, cid: int, data: bytes, allowed: Sequence[str]) -> Message:
        """Count (and tap) a client -> server message and decode it; refuse unshared roles."""
        self._count("up", rnd, len(data))
        if self.tap:
            self.tap("up", rnd, cid, data)
        msg = decode(data)
        check_roles(cid, msg, allowed)
        return msg

    def down(self, rnd: int, cid: int, msg: Message) -> Message:
        return decode(self.encode_down(rnd, cid, msg))

    def up(self, rnd: int, cid: int, msg: Message, allowed: Sequence[str]) -> Message:
        check_roles(cid, msg, allowed)  # refused before anything is encoded
        return self.decode_up(rnd, cid, encode(msg), allowed)


def with_client_seconds(update: Message, seconds: float | None) -> Message:
    """The update as received, plus the client's training seconds for the round log. Engine
    telemetry, added after the wire: wall-clock values inside the payload would make the
    byte counts (and so the two engines' comparison) vary from run to run."""
    update.metrics = {**update.metrics, "train_s": seconds}
    return update


def check_roles(cid: int, msg: Message, allowed: Sequence[str]) -> None:
    illegal = [r for r in msg.tensors if r not in allowed]
    if illegal:
        raise ProtocolViolation(
            f"client {cid} tried to send role(s) {illegal}; shared roles are {list(allowed)}"
        )


def select_clients(cfg: ExperimentConfig, rnd: int, client_ids: Sequence[int]) -> list[int]:
    k = cfg.train.clients_per_round
    if k <= 0 or k >= len(client_ids):
        return list(client_ids)
    rng = random.Random(f"select:{cfg.seed}:{rnd}")
    return sorted(rng.sample(list(client_ids), k))


@dataclass
class LoopResult:
    server_state: State
    client_states: dict[int, State]
    train_s: float


Dispatch = Callable[[int, dict[int, Message]], tuple[dict[int, Message], dict[int, str]]]
"""Delivers one round's payloads (by client id) and returns ``(updates, dropped)``: the
decoded updates of the clients that answered, and ``{client id: reason}`` for those that did
not (fault injection, timeout, an error reply); the engine decides where ``local_update``
runs (here, or on a Flower SuperNode)."""


def run_round_loop(
    algorithm: Algorithm,
    client_ids: Sequence[int],
    cfg: ExperimentConfig,
    run: RunDir,
    transport: Transport,
    server_state: State,
    dispatch: Dispatch,
    client_states: dict[int, State] | None = None,
    start_round: int = 0,
    counters: dict[str, Any] | None = None,
) -> LoopResult:
    """The server side of every engine: select, configure, dispatch, aggregate, log,
    checkpoint. ``client_states`` are checkpointed when the engine holds them (in-process)."""
    counters = counters or {"train_s": 0.0}
    client_states = client_states if client_states is not None else {}
    store = client_states if isinstance(client_states, ClientStore) else None
    ids = sorted(client_ids)
    for rnd in range(start_round, cfg.train.rounds):
        t_round = time.perf_counter()
        if store is not None:
            store.version = rnd + 1  # the sampled clients' states after this round
        selected = select_clients(cfg, rnd, ids)
        payloads = algorithm.configure_round(rnd, server_state, selected)
        received, dropped = dispatch(rnd, {cid: payloads[cid] for cid in selected})
        client_metrics = {str(cid): dict(received[cid].metrics) for cid in selected if cid in received}
        # screen (decompress + validate); below train.min_clients the round is skipped and the
        # server state stays as it was (issue 10)
        updates, rejected = screen_updates(algorithm, cfg, received, server_state)
        skipped = skip_reason(cfg, len(updates), bool(selected))
        if skipped is None:
            server_state = algorithm.aggregate(rnd, updates, server_state)
        trust = round_record(algorithm, cfg, selected, list(received), dropped, rejected, skipped,
                             counters, len(ids))
        seconds = time.perf_counter() - t_round
        counters["train_s"] = counters.get("train_s", 0.0) + seconds
        losses = [m["loss"] for m in client_metrics.values() if "loss" in m]
        record = {
            "round": rnd,
            "clients": selected,
            "loss": sum(losses) / len(losses) if losses else None,
            "client_metrics": client_metrics,
            "bytes_up": transport.per_round.get(rnd, {}).get("up", 0),
            "bytes_down": transport.per_round.get(rnd, {}).get("down", 0),
            "seconds": seconds,
            **trust,
        }
        run.log_round(record)
        say(cfg.engine.progress, round_line(label(cfg.name, cfg.seed), record, cfg.train.rounds))
        every = cfg.engine.checkpoint_every
        if every and ((rnd + 1) % every == 0 or rnd + 1 == cfg.train.rounds):
            counters.update(bytes_up=transport.bytes_up, bytes_down=transport.bytes_down)
            # a store holds the client states already (read up to this round on resume)
            run.save_checkpoint(rnd + 1, server_state, {} if store is not None else client_states, counters)
            if store is not None:
                store.committed = rnd + 1
    return LoopResult(server_state, client_states, counters["train_s"])


def resume_checkpoint(run: RunDir, transport: Transport, client_ids: Sequence[int]
                      ) -> tuple[State, dict[int, State], dict[str, Any]]:
    """The last checkpoint's server state, the states of ``client_ids`` (those the engine
    holds; none where a :class:`ClientStore` holds them) and counters; ``transport``'s byte
    counters continue from the checkpoint's."""
    server_state, client_states, counters = run.load_checkpoint(list(client_ids))
    transport.bytes_up, transport.bytes_down = counters["bytes_up"], counters["bytes_down"]
    return server_state, client_states, counters


def complete_run(run: RunDir, summary: dict[str, Any]) -> None:
    """Write report.html, then summary.json (which marks the run complete)."""
    from fedblend.reports.html import write_report

    summary.setdefault("system", system_block(run.config()))
    write_report(run.path, summary)
    run.write_summary(summary)


def system_block(config: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``system``: device, dtype, backbone quantization, threads, versions."""
    model = config["model"]
    from fedblend.algorithms import algorithm_class

    if algorithm_class(config["algorithm"]).modality == "vision":
        quant = "nf4" if config["vision"]["nf4"] else "none"
    else:
        quant = model["quantization"]
    return system_info(model["device"], model["dtype"], quant)
