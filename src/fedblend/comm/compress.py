"""Compressed uploads: a client sends its update's *delta* against the payload it received,
quantised blockwise (``fp16``, ``int8`` absmax, ``nf4`` 4-bit NormalFloat), with error
feedback: what quantisation lost this round is kept in the client's private state (role
``_residual``, checkpointed with it, never sent) and added to the next round's delta.

The compressed form is what the codec serialises (quantised codes and block scales are their
own tensors), so ``bytes_up`` counts what actually travels. The server calls
:func:`decompress` on the update before validating and aggregating it.

bitsandbytes has the same NF4 code table, but importing it takes seconds to minutes on a
loaded CPU box, so the few lines of blockwise quantisation are here, in torch.
"""

from __future__ import annotations

import torch

from fedblend.comm.codec import Message, Tensors

BLOCK = 128
RESIDUAL = "_residual"  # private-state role holding the error-feedback residual
KEY = "compress"  # Message.config key describing the compressed form
SCHEMES = ("fp16", "int8", "nf4")

# QLoRA's NF4 code (Dettmers et al. 2023; bitsandbytes.functional.get_4bit_type("nf4"))
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK), n


def quantize(x: torch.Tensor, scheme: str) -> Tensors:
    """The compressed parts of one tensor (dequantise with :func:`dequantize`)."""
    if scheme == "fp16":
        return {"q": x.detach().to(torch.float16)}
    blocks, n = _blocks(x)
    scale = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    unit = blocks / scale[:, None]
    if scheme == "int8":
        q = torch.round(unit * 127).to(torch.int8).reshape(-1)[:n]
        return {"q": q, "scale": scale}
    if scheme == "nf4":
        codes = torch.bucketize(unit.reshape(-1), (NF4[1:] + NF4[:-1]) / 2).to(torch.uint8)  # nearest
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        packed = (codes[0::2] << 4) | codes[1::2]
        return {"q": packed, "scale": scale}
    raise ValueError(f"unknown compression {scheme!r}")


def dequantize(parts: Tensors, scheme: str, shape: list[int]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if scheme == "fp16":
        return parts["q"].to(torch.float32).reshape(shape)
    scale = parts["scale"].to(torch.float32)
    if scheme == "int8":
        unit = parts["q"].to(torch.float32) / 127
    else:
        packed = parts["q"]
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()
        unit = NF4[codes]
    unit = torch.nn.functional.pad(unit[:n], (0, scale.numel() * BLOCK - n)).view(-1, BLOCK)
    return (unit * scale[:, None]).reshape(-1)[:n].reshape(shape)


def compress(update: Message, received: Message, scheme: str, residual: Tensors) -> tuple[Message, Tensors]:
    """``update`` with every shared tensor replaced by its compressed delta against
    ``received`` (absolute values where the client received no such tensor); returns the
    message and the new error-feedback residual (keyed ``role/name``)."""
    tensors: dict[str, Tensors] = {}
    meta: dict[str, dict[str, list]] = {}
    new_residual: Tensors = {}
    deltas: list[str] = []
    for role, named in update.tensors.items():
        ref = received.tensors.get(role, {})
        # a delta where every tensor has its received shape (HetLoRA's pruned upload has not)
        is_delta = set(ref) == set(named) and all(ref[k].shape == t.shape for k, t in named.items())
        if is_delta:
            deltas.append(role)
        tensors[role], meta[role] = {}, {}
        for name, t in named.items():
            value = t.detach().to(torch.float32) - (ref[name].to(torch.float32) if is_delta else 0.0)
            key = f"{role}/{name}"
            if key in residual and residual[key].shape == value.shape:
                value = value + residual[key]
            parts = quantize(value, scheme)
            new_residual[key] = value - dequantize(parts, scheme, list(value.shape))
            for part, q in parts.items():
                tensors[role][f"{name}@{part}"] = q
            meta[role][name] = [list(t.shape), str(t.dtype).removeprefix("torch.")]
    config = {**update.config, KEY: {"scheme": scheme, "delta_roles": deltas, "tensors": meta}}
    return Message(tensors, update.num_examples, dict(update.metrics), config), new_residual


def decompress(msg: Message, reference: dict[str, Tensors]) -> Message:
    """The full update from a compressed message; deltas are added to ``reference`` (the
    server's state, i.e. what it sent). Uncompressed messages are returned as they are."""
    info = msg.config.get(KEY)
    if not isinstance(info, dict):
        return msg
    scheme, deltas = str(info["scheme"]), set(info["delta_roles"])
    tensors: dict[str, Tensors] = {}
    for role, named in info["tensors"].items():
        tensors[role] = {}
        for name, (shape, dtype) in named.items():
            parts = {k.rsplit("@", 1)[1]: v for k, v in msg.tensors.get(role, {}).items()
                     if k.rsplit("@", 1)[0] == name}
            value = dequantize(parts, scheme, shape)
            if role in deltas and name in reference.get(role, {}):
                value = reference[role][name].to(torch.float32) + value
            tensors[role][name] = value.to(getattr(torch, dtype))
    config = {k: v for k, v in msg.config.items() if k != KEY}
    return Message(tensors, msg.num_examples, dict(msg.metrics), config)
