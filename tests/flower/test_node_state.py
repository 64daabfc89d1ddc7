"""A node's per-round state snapshots: what a resumed ServerApp's re-sent round trains from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from fedblend.config import load_config
from fedblend.engines.flower import wire
from fedblend.engines.flower.node import open_node

from .conftest import TINY, TINY_OVERRIDES


def _context(tmp_path: Path) -> Context:
    return Context(run_id=11, node_id=5, state=RecordDict(), run_config={},
                   node_config={wire.NODE_PARTITION: 1, wire.NODE_STATE_DIR: str(tmp_path)})


def _state(v: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"local": {"w": torch.full((2, 2), v)}}


def test_snapshots_roll_back_to_the_resume_round_and_are_pruned(tmp_path: Path) -> None:
    cfg = load_config(TINY, TINY_OVERRIDES)
    fields = {wire.CONFIG: json.dumps(cfg.to_dict()), wire.RUN_KEY: "7"}
    ctx = _context(tmp_path)
    node = open_node(fields, ctx)
    assert node.cid == 1 and node.run_dir == tmp_path / "run-7"  # the server's key, not run_id 11

    for rnd in range(3):  # checkpoint every round: the server has checkpointed `rnd` rounds
        node.save_state(ctx, _state(rnd + 1.0), rnd + 1, keep_from=rnd)
    assert sorted(node.snapshots()) == [2, 3]  # r1 can no longer be needed by a resume
    state, source, k = node.load_state(ctx, None, upto=3)
    assert (source, k) == ("context", 3) and state["local"]["w"][0, 0] == 3.0

    # a resumed ServerApp (new Flower run: empty context) re-sends round 2: the node trained it
    # already (r3 on disk) but must start from its state after 2 rounds
    fresh = _context(tmp_path)
    state, source, k = open_node(fields, fresh).load_state(fresh, None, upto=2)
    assert (source, k) == ("disk", 2) and state["local"]["w"][0, 0] == 2.0

    # the finished state (after finish_client) is never a resumable snapshot
    node.save_state(ctx, _state(9.0), 3)
    assert node.snapshots()[3].is_file() and sorted(node.snapshots()) == [2, 3]
    state, source, k = node.load_state(ctx, None, upto=3)
    assert (source, k) == ("disk", 3) and state["local"]["w"][0, 0] == 3.0


def test_only_the_snapshots_a_resume_can_need_stay_on_disk(tmp_path: Path) -> None:
    # the server checkpoints every 4 rounds: a resume restarts at 0, 4 or 8, never in between
    cfg = load_config(TINY, TINY_OVERRIDES)
    fields = {wire.CONFIG: json.dumps(cfg.to_dict()), wire.RUN_KEY: "7"}
    ctx = _context(tmp_path)
    node = open_node(fields, ctx)
    for rnd in range(7):
        node.save_state(ctx, _state(rnd + 1.0), rnd + 1, keep_from=rnd // 4 * 4)
        assert len(node.snapshots()) <= 2
    assert sorted(node.snapshots()) == [4, 7]  # the checkpoint's round and the newest

    # a ServerApp resumed at its checkpoint (4) re-sends round 4; the node trains it again and
    # the snapshot from the abandoned timeline (7) goes: a node restarted later must not
    # mistake it for its state after 7 rounds of the new one
    fresh = _context(tmp_path)
    node = open_node(fields, fresh)
    state, source, k = node.load_state(fresh, None, upto=4)
    assert (source, k) == ("disk", 4)
    node.save_state(fresh, _state(50.0), 5, keep_from=4)
    assert sorted(node.snapshots()) == [4, 5]
    restarted = _context(tmp_path)
    state, source, k = open_node(fields, restarted).load_state(restarted, None, upto=7)
    assert (source, k) == ("disk", 5) and state["local"]["w"][0, 0] == 50.0
