"""Cross-cutting trust features that wrap any algorithm (Flower's DP-wrapper pattern).

:func:`wrap_algorithm` is applied by :func:`fedblend.algorithms.make_algorithm`, so both
engines (in-process, and Flower's ClientApp and ServerApp) get the same behaviour:

client side (``local_update``), on the delta of each shared role against the payload received:
  1. DP clipping to ``privacy.clip``;
  2. a simulated attack on the clients in ``attack.clients`` (a hostile client skips nothing
     but the honest rules: it attacks after clipping);
  3. compression (``comm.compress``) with an error-feedback residual in the private state.

server side (``aggregate``), on decompressed, validated updates (see
:func:`fedblend.aggregation.validate.screen`): per-update delta clipping
(``aggregate.clip_norm``), the rule (``aggregate.rule``), then DP noise on the mean, then the
algorithm's server step (``train.server_lr`` / ``server_momentum``).

Everything the wrapped algorithm does not define is delegated to it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from fedblend.aggregation import robust
from fedblend.algorithms.base import ClientContext, State
from fedblend.comm import compress as cz
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig
from fedblend.privacy import dp


def needs_wrapper(cfg: ExperimentConfig) -> bool:
    return (
        cfg.aggregate.rule != "fedavg" or cfg.aggregate.clip_norm > 0 or cfg.attack.kind != "none"
        or cfg.privacy.clip > 0 or cfg.comm.compress != "none"
    )


def wrap_algorithm(algorithm: Any, cfg: ExperimentConfig) -> Any:
    """``algorithm`` itself when no trust feature is on (bit-identical runs), else wrapped."""
    return TrustWrapper(algorithm, cfg) if needs_wrapper(cfg) and algorithm.shared_roles else algorithm


def _delta(update: State, received: State) -> State:
    return {r: {k: t.to(torch.float32) - received[r][k].to(torch.float32) for k, t in named.items()}
            for r, named in update.items()}


def _apply(received: State, delta: State, like: State) -> State:
    return {r: {k: (received[r][k].to(torch.float32) + d).to(like[r][k].dtype) for k, d in named.items()}
            for r, named in delta.items()}


def attack(delta: State, kind: str, scale: float, seed: int) -> State:
    """A hostile client's delta: ``sign_flip`` -> -scale*delta, ``scale`` -> scale*delta,
    ``gaussian`` -> N(0, scale^2) noise in place of the delta."""
    if kind == "sign_flip":
        return {r: {k: -scale * t for k, t in n.items()} for r, n in delta.items()}
    if kind == "scale":
        return {r: {k: scale * t for k, t in n.items()} for r, n in delta.items()}
    if kind == "gaussian":
        g = torch.Generator().manual_seed(seed)
        return {r: {k: torch.randn(t.shape, generator=g) * scale for k, t in sorted(n.items())}
                for r, n in sorted(delta.items())}
    return delta


class TrustWrapper:
    """``algorithm`` with clipping, attacks, compression, robust rules and DP around it."""

    def __init__(self, algorithm: Any, cfg: ExperimentConfig) -> None:
        self._a = algorithm
        self.cfg = cfg
        self.last_aggregation: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)

    @property
    def inner(self) -> Any:
        return self._a

    # ---- client side --------------------------------------------------------------------
    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        cfg = self.cfg
        residual = state.get(cz.RESIDUAL, {})
        inner_state = {r: v for r, v in state.items() if r != cz.RESIDUAL}
        update, new_state = self._a.local_update(ctx, payload, inner_state)
        received = {r: payload.tensors[r] for r in update.tensors
                    if r in payload.tensors and set(payload.tensors[r]) == set(update.tensors[r])}
        if received:
            delta = _delta({r: update.tensors[r] for r in received}, received)
            changed = False
            if cfg.privacy.clip > 0:
                delta, pre = robust.clip(delta, cfg.privacy.clip)
                update.metrics = {**update.metrics, "dp_delta_norm": pre}
                changed = True
            if cfg.attack.kind != "none" and ctx.cid in cfg.attack.clients:
                delta = attack(delta, cfg.attack.kind, cfg.attack.scale, ctx.seed)
                changed = True
            if changed:
                update.tensors = {**update.tensors, **_apply(received, delta, update.tensors)}
        new_state = dict(new_state)
        if cfg.comm.compress != "none":
            update, new_state[cz.RESIDUAL] = cz.compress(update, payload, cfg.comm.compress, residual)
        return update, new_state

    # ---- server side --------------------------------------------------------------------
    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        """``updates`` are decompressed and validated (see ``validate.screen``)."""
        cfg = self.cfg
        a = cfg.aggregate
        use_dp = cfg.privacy.clip > 0
        if a.rule == "fedavg" and a.clip_norm <= 0 and not use_dp:
            self.last_aggregation = {"rule": "fedavg"}
            return self._a.aggregate(rnd, updates, server_state)
        roles = [r for r in self._a.shared_roles if r in server_state]
        ref = {r: server_state[r] for r in roles}
        deltas, clipped = [], []
        for cid in sorted(updates):
            u = updates[cid]
            d = _delta({r: u.tensors[r] for r in roles}, ref)
            if a.clip_norm > 0:
                d, pre = robust.clip(d, a.clip_norm)
                if pre > a.clip_norm:
                    clipped.append(cid)
            # DP: the unweighted mean of the (client-clipped) deltas, as in Flower's wrappers
            deltas.append((d, 1.0 if use_dp else float(u.num_examples)))
        mean = robust.aggregate_deltas(a.rule, deltas, a.trim_ratio, a.krum_f)
        info: dict[str, Any] = {"rule": a.rule}
        if a.clip_norm > 0:
            info["clipped"] = clipped
        if use_dp:
            std = dp.noise_std(cfg.privacy.noise_multiplier, cfg.privacy.clip, len(deltas))
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)
            mean = dp.add_noise(mean, std, g)
            info["dp_noise_std"] = std
        self.last_aggregation = info
        new = dict(server_state)
        new.update(_apply(ref, mean, ref))
        return self._a.server_update(new, server_state)
