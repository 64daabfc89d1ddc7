"""The trust steps of the round loop (issue 10), kept out of the loop itself: seeded fault
injection, screening (decompress + validate), ``train.min_clients``, and the per-round
record (sampled / answered / dropped / rejected / aggregation / privacy)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from fedblend.aggregation.validate import screen
from fedblend.comm.codec import Message
from fedblend.config import ExperimentConfig
from fedblend.privacy.dp import privacy_record

FAULT = "fault injection (faults.drop_prob)"


def fault_dropped(cfg: ExperimentConfig, rnd: int, cid: int) -> bool:
    """Whether seeded fault injection fails client ``cid``'s update in round ``rnd``."""
    p = cfg.faults.drop_prob
    return p > 0 and random.Random(f"drop:{cfg.seed}:{rnd}:{cid}").random() < p


def screen_updates(
    algorithm: Any, cfg: ExperimentConfig, updates: dict[int, Message], server_state: dict
) -> tuple[dict[int, Message], dict[int, str]]:
    roles = tuple(algorithm.shared_roles)
    expected = getattr(algorithm, "expected_update", None)  # rank-r_i updates: their own shapes
    return screen(updates, server_state, roles, cfg.aggregate.max_update_norm,
                  (lambda cid, msg: expected(cid, server_state, msg)) if expected else None)


def skip_reason(cfg: ExperimentConfig, accepted: int, expected_any: bool) -> str | None:
    """Why the round cannot aggregate (fewer valid updates than ``train.min_clients``)."""
    if expected_any and accepted < cfg.train.min_clients:
        return f"{accepted} valid update(s), fewer than train.min_clients = {cfg.train.min_clients}"
    return None


def round_record(
    algorithm: Any, cfg: ExperimentConfig, selected: Sequence[int], answered: Sequence[int],
    dropped: dict[int, str], rejected: dict[int, str], skipped: str | None,
    counters: dict[str, Any], num_clients: int,
) -> dict[str, Any]:
    """The trust fields of one metrics.jsonl line; counts DP releases in ``counters``."""
    rec: dict[str, Any] = {
        "sampled": list(selected),
        "answered": sorted(answered),
        "dropped": {str(c): r for c, r in sorted(dropped.items())},
        "rejected": {str(c): r for c, r in sorted(rejected.items())},
        "aggregation": (None if skipped else getattr(algorithm, "last_aggregation", None))
        or {"rule": cfg.aggregate.rule},
    }
    if skipped:
        rec["skipped"] = skipped
    if cfg.privacy.clip > 0:
        if not skipped:
            counters["dp_rounds"] = counters.get("dp_rounds", 0) + 1
        rec["privacy"] = privacy_record(cfg, num_clients, counters.get("dp_rounds", 0))
    return rec


def last_privacy(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json's ``privacy``: the record after the last round (None without DP)."""
    return next((r["privacy"] for r in reversed(rounds) if "privacy" in r), None)
