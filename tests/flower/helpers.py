"""Assertions shared by the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedblend.config import load_config
from fedblend.runner import run_experiment


def inprocess_reference(config: Path, overrides: list[str], out: Path) -> dict:
    """The in-process run of the same config; its scores must not be all zero (a comparison of
    0.0 with 0.0 checks nothing). Some clients' own-task P may be 0 on the tiny fitted model
    (`local` on two clients: P 0.0 and 0.0, TTP 0.0 and 0.07): some score must not be."""
    summary = run_experiment(load_config(config, overrides), out)
    if "accuracy" in summary:  # vision: accuracy, not text scores
        return summary
    clients = summary["clients"].values()
    assert any(c["P"] > 0 or c["TTP"] > 0 for c in clients), summary["clients"]
    return summary


def assert_adapters_equal(a: Path, b: Path) -> None:
    """Bit for bit, as docs/distributed.md says of the tiny configs."""
    ta = load_file(str(a / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), (k, float((ta[k] - tb[k]).abs().max()))


# FedDPA's dynamic instance weights come from embeddings; in-process evaluation embeds every
# client's inputs in shared batches (eval.cross_client_batch), a node its own client's only, and
# the other batch composition moves a weight in its last float32 bits (measured in-process,
# cross_client_batch on vs off: up to 7.5e-9, every answer the same)
WEIGHT_ATOL = 1e-6


def assert_same_predictions(a: Path, b: Path) -> None:
    """eval/predictions.jsonl line by line: every answer and reference equal, every mixing
    weight within WEIGHT_ATOL."""
    la = [json.loads(x) for x in (a / "eval" / "predictions.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        wx, wy = x.pop("weight", None), y.pop("weight", None)
        assert x == y
        assert (wx is None) == (wy is None), (wx, wy)
        if wx is not None:
            assert abs(wx - wy) <= WEIGHT_ATOL, (x, wx, wy)
    assert any(x["prediction"] for x in la)  # answers, not empty strings


def received_messages(run_dir: Path) -> list[dict]:
    lines = (run_dir / "flower" / "messages.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def assert_no_private_tensors(run_dir: Path, shared_roles: list[str], n_clients: int, rounds: int) -> None:
    """Every message the server received: updates carry only shared roles, nothing else
    carries tensors at all."""
    msgs = received_messages(run_dir)
    kinds = [m["type"] for m in msgs]
    assert kinds.count("train") == n_clients * rounds
    assert kinds.count("evaluate") == n_clients
    for m in msgs:
        assert m["records"]["arrays"] == {}, m  # no ArrayRecord in any reply
        if m["type"] == "train":
            assert set(m["roles"]) <= set(shared_roles), m
            assert all(t.split("::")[0] in shared_roles for t in m["tensors"]), m
        else:
            assert "roles" not in m and "update" not in m["records"]["configs"].get("fedblend", []), m
