"""Where and in what precision the frozen backbones compute (``model.device``, ``model.dtype``).

``model.device``: ``auto`` (the first CUDA device when torch sees one, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``. ``model.dtype``: the autocast precision of the forward passes;
trainable adapters and their optimizer state stay float32. Impossible choices (CUDA where
there is none, a device index past the count, float16 on the CPU) fail at config load with
one line naming the key. torch is imported only when a check needs it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any

from fedblend.errors import ConfigError

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "flwr")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str) -> Any:
    """The ``torch.device`` that ``model.device`` names on this machine (ConfigError if none)."""
    import torch

    if device == "auto":
        return torch.device("cuda:0" if cuda_count() else "cpu")
    if device.startswith("cuda"):
        n = cuda_count()
        if n == 0:
            raise ConfigError(f"model.device: {device!r} but torch sees no CUDA device here "
                              "(use 'auto' or 'cpu')")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= n:
            raise ConfigError(f"model.device: {device!r} but this machine has {n} CUDA device(s) "
                              f"(cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    return torch.device(device)


def check_device(mc: Any) -> None:
    """Validate ``model.device`` / ``model.dtype`` / ``model.compute_dtype`` against this machine
    (raises ValueError with the key, as config validators do)."""
    wants_fp16 = "float16" in (mc.dtype, mc.compute_dtype)
    if mc.device == "cpu" or not (mc.device.startswith("cuda") or wants_fp16):
        kind = "cpu" if mc.device == "cpu" else None
    else:
        try:
            kind = resolve_device(mc.device).type
        except ConfigError as e:
            raise ValueError(str(e)) from None
    if kind == "cpu" and wants_fp16:
        key = "model.dtype" if mc.dtype == "float16" else "model.compute_dtype"
        raise ValueError(f"{key}: float16 needs a CUDA device (the model runs on the CPU here); "
                         "use bfloat16 or float32")


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compute_dtype(mc: Any) -> Any:
    """The NF4 layers' compute dtype (``model.compute_dtype``; ``auto`` = ``model.dtype``)."""
    return torch_dtype(mc.dtype if mc.compute_dtype == "auto" else mc.compute_dtype)


def autocast(device: Any, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device`` for a forward pass; a no-op in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=torch_dtype(dtype))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def system_info(device: str, dtype: str, quantization: str) -> dict[str, Any]:
    """summary.json's ``system`` block: where the run computed and with what."""
    import torch

    dev = resolve_device(device)
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": dtype,
        "quantization": quantization,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
