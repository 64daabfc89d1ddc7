"""The in-process engine: sequential clients on one shared frozen backbone.

The engine owns the loop (client sampling, transport, checkpoints, timing, progress);
algorithms own the maths. Client private state is kept as adapter tensors per client, never
as a model copy. Every message crosses an encode/decode boundary (:class:`Transport`), so
byte counts are exact and the server never holds a reference to client memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fedblend.algorithms.base import Algorithm, ClientContext, State, client_seed
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig
from fedblend.rounds import (  # noqa: F401  (re-exported: the engine's public names)
    Dispatch,
    LoopResult,
    ProtocolViolation,
    Tap,
    Transport,
    check_roles,
    run_round_loop,
    select_clients,
    with_client_seconds,
)
from fedblend.store.rundir import RunDir
from fedblend.trust import FAULT, fault_dropped


def local_dispatch(
    algorithm: Algorithm,
    trainer: Any,
    train_data: dict[int, Sequence[Any]],
    cfg: ExperimentConfig,
    transport: Transport,
    client_states: dict[int, State],
    progress: Any = None,
) -> Dispatch:
    """In-process delivery: every selected client's ``local_update`` runs here, in turn."""

    def dispatch(rnd: int, payloads: dict[int, Message]) -> tuple[dict[int, Message], dict[int, str]]:
        task = None
        if progress is not None:
            total = sum(algorithm.update_steps(len(train_data[c]), rnd, trainer) for c in payloads)
            task = progress.add_task(f"round {rnd + 1}/{cfg.train.rounds}", total=total)
        updates: dict[int, Message] = {}
        dropped: dict[int, str] = {}
        for cid, sent in payloads.items():
            payload = transport.down(rnd, cid, sent)
            if fault_dropped(cfg, rnd, cid):  # seeded fault injection (faults.drop_prob)
                dropped[cid] = FAULT
                continue
            ctx = ClientContext(
                cid=cid, round=rnd, seed=client_seed(cfg.seed, rnd, cid), examples=train_data[cid],
                trainer=trainer, cfg=cfg,
                progress=(lambda n, t=task: progress.advance(t, n)) if task is not None else None,
            )
            t = time.perf_counter()
            update, client_states[cid] = algorithm.local_update(ctx, payload, client_states.get(cid, {}))
            seconds = time.perf_counter() - t
            updates[cid] = with_client_seconds(transport.up(rnd, cid, update, algorithm.shared_roles), seconds)
        if task is not None:
            progress.remove_task(task)
        return updates, dropped

    return dispatch


def run_rounds(
    algorithm: Algorithm,
    trainer: Any,
    train_data: dict[int, Sequence[Any]],
    cfg: ExperimentConfig,
    run: RunDir,
    transport: Transport,
    server_state: State,
    client_states: dict[int, State],
    start_round: int = 0,
    progress: Any = None,
    counters: dict[str, Any] | None = None,
) -> LoopResult:
    """Run rounds ``start_round..cfg.train.rounds-1``; log, checkpoint, return final states."""
    dispatch = local_dispatch(algorithm, trainer, train_data, cfg, transport, client_states, progress)
    return run_round_loop(
        algorithm, sorted(train_data), cfg, run, transport, server_state, dispatch,
        client_states=client_states, start_round=start_round, counters=counters,
    )
