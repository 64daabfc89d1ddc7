"""Update validation before aggregation: a bad update is excluded with its reason, the run
goes on. Checks every shared tensor against the server's state (names, shapes, dtypes),
rejects NaN/Inf, and (optionally) deltas whose L2 norm exceeds ``aggregate.max_update_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fedblend.comm.codec import Message, State, Tensors
from fedblend.comm.compress import decompress


def delta_norm(update: dict[str, Tensors], reference: State) -> float:
    """L2 norm of ``update - reference`` over every tensor of every role (absolute values
    where the reference has no such tensor)."""
    total = 0.0
    for role, named in update.items():
        ref = reference.get(role, {})
        for name, t in named.items():
            d = t.to(torch.float64) - (ref[name].to(torch.float64) if name in ref else 0.0)
            total += float((d * d).sum())
    return math.sqrt(total)


def problem(update: Message, server_state: State, shared_roles: tuple[str, ...], max_norm: float) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is fine."""
    for role, named in update.tensors.items():
        ref = server_state.get(role)
        if ref is None:
            continue  # a role the server holds no state for (the algorithm's own business)
        missing, extra = sorted(set(ref) - set(named)), sorted(set(named) - set(ref))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            return f"{role}: tensor names differ from the server's ({what})"
        for name, t in named.items():
            if tuple(t.shape) != tuple(ref[name].shape):
                return f"{role}/{name}: shape {list(t.shape)}, expected {list(ref[name].shape)}"
            if t.dtype != ref[name].dtype:
                return f"{role}/{name}: dtype {t.dtype}, expected {ref[name].dtype}"
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{role}/{name}: contains NaN or Inf"
    if not any(r in update.tensors for r in shared_roles if r in server_state) and any(
        r in server_state for r in shared_roles
    ):
        return "carries none of the shared roles"
    if max_norm > 0:
        norm = delta_norm({r: update.tensors[r] for r in update.tensors if r in server_state}, server_state)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds aggregate.max_update_norm {max_norm:g}"
    return None


def screen(
    updates: dict[int, Message], server_state: State, shared_roles: tuple[str, ...], max_norm: float,
    expected: Callable[[int, Message], State] | None = None,
) -> tuple[dict[int, Message], dict[int, str]]:
    """Decompress and validate every update: ``(accepted, rejected {cid: reason})``.
    ``expected(cid, update)``: the state that client's update is checked against (default the
    server's; see ``Algorithm.expected_update``)."""
    accepted: dict[int, Message] = {}
    rejected: dict[int, str] = {}
    for cid, msg in updates.items():
        reference = expected(cid, msg) if expected is not None else server_state
        try:
            full = decompress(msg, reference)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
            # a malformed compressed form is the client's fault, not the run's
            rejected[cid] = f"malformed compressed update ({e.__class__.__name__}: {e})"
            continue
        reason = problem(full, reference, shared_roles, max_norm)
        if reason is None:
            accepted[cid] = full
        else:
            rejected[cid] = reason
    return accepted, rejected
