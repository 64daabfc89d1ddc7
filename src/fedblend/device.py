"""Where and in what precision the frozen backbones compute (``model.device``, ``model.dtype``).

``model.device``: ``auto`` (the first CUDA device when torch sees one, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``. ``model.dtype``: the precision of the frozen backbone's weights and of the forward
passes (autocast); trainable adapters and their optimizer state stay float32 (see
:func:`fedblend.adapters.lora.DualLoRA`). ``auto`` picks bfloat16 where the hardware computes it
natively (a CPU with AMX, a CUDA device that supports it) and float32 elsewhere
(:func:`resolve_dtype`); the run records the choice in summary.json's ``system`` block.
Impossible choices (CUDA where there is none, a device index past the count, float16 on the
CPU) fail at config load with one line naming the key. torch is imported only when a check
needs it.
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


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Intel Sapphire Rapids and later): torch's own
    cpuinfo query (``torch.cpu.get_capabilities``), else the ``amx_bf16`` flag in /proc/cpuinfo."""
    import torch

    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            return bool(caps().get("amx_bf16", False))
        except RuntimeError:  # cpuinfo could not read this CPU: fall back to the kernel's flags
            pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def bf16_native(device: Any) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 natively, and the reason in words."""
    import torch

    if device.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'does not support'} bfloat16"
    if device.type == "cpu":
        ok = cpu_has_amx_bf16()
        return ok, "the CPU has AMX (amx_bf16)" if ok else "the CPU has no AMX (no amx_bf16 flag)"
    return False, f"no bfloat16 check for {device.type} devices"


def resolve_dtype(dtype: str, device: Any) -> str:
    """``model.dtype`` on ``device`` (a ``torch.device``): ``auto`` becomes bfloat16 where
    :func:`bf16_native` says so, float32 otherwise; other names are returned as they are."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_native(device)[0] else "float32"


def with_resolved_dtype(cfg: Any) -> Any:
    """``cfg`` (an ExperimentConfig) itself, or a copy with ``model.dtype = "auto"`` resolved
    for the device ``model.device`` names here."""
    if cfg.model.dtype != "auto":
        return cfg
    out = cfg.model_copy(deep=True)
    out.model.dtype = resolve_dtype("auto", resolve_device(cfg.model.device))
    return out


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compute_dtype(mc: Any, device: Any = None) -> Any:
    """The NF4 layers' compute dtype (``model.compute_dtype``; ``auto`` = ``model.dtype``,
    itself resolved for ``device`` (default: the one ``model.device`` names) when ``auto``)."""
    name = mc.dtype if mc.compute_dtype == "auto" else mc.compute_dtype
    return torch_dtype(resolve_dtype(name, resolve_device(mc.device) if device is None else device))


def autocast(device: Any, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` (``auto`` resolved for ``device``) on ``device`` for a forward
    pass; a no-op in float32."""
    dtype = resolve_dtype(dtype, device)
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
    """summary.json's ``system`` block: where the run computed and with what. ``dtype`` is the
    precision the run computed in (``auto`` resolved here); ``dtype_requested`` is the config's
    ``model.dtype`` and ``bf16_native`` says whether this host computes bfloat16 natively."""
    import torch

    dev = resolve_device(device)
    native, why = bf16_native(dev)
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": resolve_dtype(dtype, dev),
        "dtype_requested": dtype,
        "bf16_native": native,
        "bf16_reason": why,
        "quantization": quantization,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
