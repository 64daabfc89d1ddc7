"""What FLoRA and FedEx-LoRA share: each round's aggregate is (partly) merged into the frozen
base weights, and every client must hold the same base before it trains or is evaluated.

Versions. The server counts its merges (``version`` V). After a merge it keeps that round's
*increment* (the factored or dense form :func:`fedblend.aggregation.exact.choose` picked), the
*cumulative* dense delta (the sum of every increment, ``d_out x d_in`` per layer) and, per
client, the version the client last reported from (``sync``). A payload brings a client to V:

- nothing, if the client is at V already;
- the increment, if it is at V - 1 (it adds it);
- the cumulative delta, if it is further behind (it replaces its own: catch-up after missed
  rounds, ``train.clients_per_round`` < clients), so ``bytes_down`` count what each client needs.

A client keeps its cumulative delta (role :data:`~fedblend.comm.codec.BASE_DELTA`) and its
version in its private state (a Flower SuperNode keeps it between rounds; the in-process
engine per client) and sets ``W = W0 + delta`` on the backbone before training
(``DualLoRA.set_base_delta``: the engine's one shared backbone serves every client in turn).
The server learns a client's version from the update it answers with; a client that received
a payload but whose update was lost is sent the cumulative delta next time (setting it is
idempotent). The final payload is one message for every client: the last increment when every
client is at V - 1 or V, else the cumulative delta. Evaluation loads ``W0 + delta`` through
``eval_adapters`` (plus FedEx-LoRA's global LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedblend.aggregation import exact
from fedblend.algorithms.base import Algorithm
from fedblend.comm.codec import BASE_DELTA, Message, State, Tensors
from fedblend.config import ExperimentConfig

SYNC = "sync"  # server: {"version", "<cid>": last version heard from}; client: {"version"}
INCREMENT = "increment"  # the last merge's increment (factored and/or dense layers)
CUMULATIVE = "cumulative"  # the sum of every increment, dense (catch-up)
VERSION = "version"


def _int(t: torch.Tensor | None) -> int:
    return int(t.item()) if t is not None else 0


class MergesIntoBase(Algorithm):
    """The base-merging protocol; subclasses train and aggregate (see the module docstring)."""

    mean_aggregation = False
    downlink_setting = "broadcast"  # the Settings field naming the increment's form

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        n = cls.name
        if cfg.model.quantization != "none":
            raise ValueError(f"model.quantization: {n} adds its aggregate to the frozen weights; "
                             "4/8-bit weights cannot take it exactly (use 'none')")
        if cfg.train.server_lr != 1.0 or cfg.train.server_momentum != 0.0:
            key = "train.server_lr" if cfg.train.server_lr != 1.0 else "train.server_momentum"
            raise ValueError(f"{key}: {n}'s aggregate is exact, not a mean a server optimizer steps along")
        if cfg.eval.every:
            raise ValueError(f"eval.every: {n}'s model includes a base-weight delta that per-round "
                             "scoring does not load; use 0")
        if cfg.lora.dora:
            raise ValueError(f"lora.dora: {n}'s merge sits inside DoRA's normalisation and is no longer "
                             "exact (METHODS.md section 8e)")

    # ---- server ---------------------------------------------------------------------------------
    @staticmethod
    def version(server_state: State) -> int:
        return _int(server_state.get(SYNC, {}).get(VERSION))

    def all_clients(self) -> list[int]:
        d = self.cfg.data
        return list(d.clients) if d.clients else list(range(d.num_clients))

    def fresh_server_state(self) -> State:
        return {SYNC: {VERSION: torch.tensor(0, dtype=torch.int64)}}

    def base_part(self, server_state: State, behind: int) -> tuple[dict[str, Tensors], dict[str, Any]]:
        """The payload roles that bring a client at version ``behind`` to the server's."""
        v = self.version(server_state)
        if behind == v or v == 0:
            return {}, {VERSION: v}
        if behind == v - 1 and INCREMENT in server_state:
            return {INCREMENT: server_state[INCREMENT]}, {VERSION: v}
        return {CUMULATIVE: server_state[CUMULATIVE]}, {VERSION: v}

    def client_version(self, server_state: State, cid: int) -> int:
        return _int(server_state.get(SYNC, {}).get(str(cid)))

    def configure_round(self, rnd: int, server_state: State, client_ids: Sequence[int]) -> dict[int, Message]:
        shared = {role: server_state[role] for role in self.shared_roles if role in server_state}
        out = {}
        for cid in client_ids:
            base, config = self.base_part(server_state, self.client_version(server_state, cid))
            out[cid] = Message(tensors={**shared, **base}, config={"round": rnd, **config})
        return out

    def merged(self, server_state: State, answered: Sequence[int],
               factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> State:
        """The server state after merging ``scale * B @ A`` per layer (``factors``:
        ``{prefix: (A, B)}``): the next version, its increment in the form the settings ask
        for, the cumulative delta, and ``answered`` recorded at the version they trained on."""
        v = self.version(server_state)
        inc = exact.choose(factors, scale, getattr(self.settings, self.downlink_setting))
        sync = dict(server_state.get(SYNC, {}))
        for cid in answered:
            sync[str(cid)] = torch.tensor(v, dtype=torch.int64)
        sync[VERSION] = torch.tensor(v + 1, dtype=torch.int64)
        new = dict(server_state)
        new.update({INCREMENT: inc, CUMULATIVE: exact.add(server_state.get(CUMULATIVE, {}), inc), SYNC: sync})
        return new

    def final_payload(self, server_state: State) -> Message:
        shared = {role: server_state[role] for role in self.shared_roles if role in server_state}
        behind = min(self.client_version(server_state, c) for c in self.all_clients())
        base, config = self.base_part(server_state, behind)  # the increment serves V - 1 and V
        return Message(tensors={**shared, **base}, config=config)

    def global_base_delta(self, server_state: State) -> Tensors | None:
        return dict(server_state.get(CUMULATIVE, {}))

    # ---- client ---------------------------------------------------------------------------------
    @staticmethod
    def synced(payload: Message, state: State) -> State:
        """The client's state brought to the payload's version (its cumulative delta updated)."""
        v_to = int(payload.config.get(VERSION, 0))  # type: ignore[call-overload]
        v = _int(state.get(SYNC, {}).get(VERSION))
        delta = dict(state.get(BASE_DELTA, {}))
        if CUMULATIVE in payload.tensors:
            delta = dict(payload.tensors[CUMULATIVE])
        elif INCREMENT in payload.tensors and v == v_to - 1:
            delta = exact.add(delta, payload.tensors[INCREMENT])
        elif v != v_to:
            raise RuntimeError(f"base weights at version {v}, the server's at {v_to}: the payload "
                               "cannot bring them there")
        return {**state, BASE_DELTA: delta, SYNC: {VERSION: torch.tensor(v_to, dtype=torch.int64)}}

    def load_base(self, trainer: Any, state: State) -> None:
        trainer.adapters.set_base_delta(state.get(BASE_DELTA, {}))

    def finish_client(self, ctx, final: Message, state: State) -> State:
        return self.synced(final, state)
