"""The wire format of every message between server and clients, and its byte count.

A :class:`Message` holds named tensors grouped by role (``global``, ``generator``, ...),
an example count and scalar metrics. Engines send ``encode(msg)`` bytes (safetensors with
JSON metadata) and the receiver works on ``decode(bytes)``, so nothing is shared by
reference across the client/server boundary and ``len(bytes)`` is exactly what travels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

Tensors = dict[str, torch.Tensor]
State = dict[str, Tensors]
"""Named tensors grouped by role (``global``, ``local``, ...): a client's or the server's state."""
BASE_DELTA = "base_delta"
"""The role of a dense increment of the frozen base weights (FLoRA, FedEx-LoRA): PEFT module
prefix -> ``d_out x d_in``. In ``Algorithm.eval_adapters`` it is loaded into the backbone
(``DualLoRA.set_base_delta``), not as a LoRA adapter."""
SEP = "::"


@dataclass
class Message:
    tensors: dict[str, Tensors] = field(default_factory=dict)
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)

    @property
    def roles(self) -> list[str]:
        return sorted(self.tensors)

    def num_bytes(self) -> int:
        return len(encode(self))


def encode(msg: Message) -> bytes:
    flat = {
        f"{role}{SEP}{key}": t.detach().contiguous().cpu()
        for role, tensors in msg.tensors.items()
        for key, t in tensors.items()
    }
    meta = {
        "num_examples": str(msg.num_examples),
        "metrics": json.dumps(msg.metrics),
        "config": json.dumps(msg.config),
        "roles": json.dumps(sorted(msg.tensors)),
    }
    return st_save(flat, metadata=meta)


def decode(data: bytes) -> Message:
    from safetensors import safe_open  # noqa: F401  (ensures the package is complete)

    flat = st_load(data)
    meta = _metadata(data)
    tensors: dict[str, Tensors] = {role: {} for role in json.loads(meta.get("roles", "[]"))}
    for name, t in flat.items():
        role, key = name.split(SEP, 1)
        tensors.setdefault(role, {})[key] = t
    return Message(
        tensors=tensors,
        num_examples=int(meta.get("num_examples", "0")),
        metrics=json.loads(meta.get("metrics", "{}")),
        config=json.loads(meta.get("config", "{}")),
    )


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}) or {}
