"""Assertions shared by the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedblend.config import load_config
from fedblend.runner import run_experiment


def inprocess_reference(config: Path, overrides: list[str], out: Path) -> dict:
    return run_experiment(load_config(config, overrides), out)


def assert_adapters_close(a: Path, b: Path, tol: float = 1e-5) -> None:
    ta = load_file(str(a / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=tol, rtol=0), k


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
