"""Several clients' LoRA adapters in one batch over the frozen backbone (row-select LoRA).

Client models that differ only in their LoRA tensors share every backbone weight, so one
forward pass can serve rows of several clients: in each PEFT LoRA layer, for every role whose
tensors differ between the clients, ``lora_A[role]`` and ``lora_B[role]`` are temporarily
replaced by :class:`RowSelectLinear` modules holding the clients' stacked weights
(``(C, r, in)`` and ``(C, out, r)``) and a shared per-row client index; row ``i`` computes
``x_i @ A[c_i].T @ B[c_i].T``. Roles identical for every client keep their plain modules (their
tensors are loaded once). Each row's mixing weight goes through PEFT's scaling exactly as in
:meth:`DualLoRA.mixing` (a per-instance ``(B, 1, 1)`` tensor), so PEFT's own LoRA forward
(``result + lora_B(lora_A(dropout(x))) * scaling``) is untouched; dropout is inactive in eval.
Greedy generation with a KV cache keeps the batch rows in place (finished rows are padded,
not removed), so the index stays valid for every decoding step.

Why not PEFT's mixed-adapter batches (``adapter_names=`` in ``LoraLayer._mixed_batch_forward``):
they give each row exactly ONE adapter, scaled by that adapter's fixed ``scaling``; FedDPA mixes
two roles in every row with per-row weights (global ``1 - w_i`` and local ``w_i``), which that
path cannot express, and it would need every client's adapters registered as separate PEFT
adapters (``add_adapter`` per client and role, ``C x roles`` module sets) for each evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft.tuners.lora import LoraLayer

from fedblend.adapters.lora import DualLoRA
from fedblend.comm.codec import State


class RowIndex:
    """The client index of each batch row, shared by every :class:`RowSelectLinear`."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.version = 0

    def set(self, index: torch.Tensor | None) -> None:
        self.index = index
        self.version += 1


class RowSelectLinear(torch.nn.Module):
    """A bias-free Linear whose weight is chosen per batch row: ``weight`` is ``(C, out, in)``.

    It stands in for a PEFT ``lora_A[role]`` / ``lora_B[role]`` module; PEFT reads only
    ``.weight.dtype`` from it (to cast the input) and calls it on ``(B, ..., in)``.
    """

    def __init__(self, weight: torch.Tensor, rows: RowIndex) -> None:
        super().__init__()
        self.weight = weight
        self.rows = rows
        self._gathered: tuple[int, torch.Tensor] | None = None

    def _rows_weight(self) -> torch.Tensor:
        """``(B, in, out)``: each row's weight, transposed; gathered once per batch."""
        if self._gathered is None or self._gathered[0] != self.rows.version:
            if self.rows.index is None:
                raise RuntimeError("cross-client LoRA used outside CrossClientLoRA.rows()")
            self._gathered = (self.rows.version, self.weight[self.rows.index].transpose(1, 2))
        return self._gathered[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._rows_weight()
        if x.shape[0] != w.shape[0]:
            raise RuntimeError(f"cross-client LoRA: batch of {x.shape[0]} rows, {w.shape[0]} row indices")
        y = torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[-1])


class CrossClientLoRA:
    """Several client models (each ``{role: {peft key: tensor}}``, same roles and keys) on one
    :class:`DualLoRA`. Inside :meth:`active`, a forward pass run inside :meth:`rows` gives row
    ``i`` the adapters of model ``index[i]``."""

    def __init__(self, adapters: DualLoRA, models: Sequence[State]) -> None:
        if not models:
            raise ValueError("CrossClientLoRA needs at least one client model")
        self.adapters = adapters
        self.models = list(models)
        roles = set(self.models[0])
        for m in self.models[1:]:
            if set(m) != roles:
                raise ValueError(f"client models hold different roles: {sorted(roles)} vs {sorted(m)}")
        self.roles = sorted(roles)
        self.varying = [r for r in self.roles if not _all_equal([m[r] for m in self.models])]
        self._index = RowIndex()
        self._layers = [(n, m) for n, m in adapters.model.named_modules() if isinstance(m, LoraLayer)]
        self.device = next(adapters.model.parameters()).device

    def _stacked(self, name: str, role: str, kind: str, like: torch.Tensor) -> torch.Tensor:
        key = f"{name}.{kind}.weight"
        return torch.stack([m[role][key].to(device=like.device, dtype=like.dtype) for m in self.models])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Load the roles all models share; swap row-select modules in for the others."""
        for role in self.roles:
            if role not in self.varying:
                self.adapters.set(role, self.models[0][role])
        saved: list[tuple[torch.nn.ModuleDict, str, torch.nn.Module]] = []
        try:
            for name, layer in self._layers:
                for role in self.varying:
                    for kind in ("lora_A", "lora_B"):
                        modules: torch.nn.ModuleDict = getattr(layer, kind)
                        plain = modules[role]
                        stacked = self._stacked(name, role, kind, plain.weight)
                        saved.append((modules, role, plain))
                        # no PEFT API gives one adapter different weights per batch row (its
                        # adapter_names= batches pick one whole adapter per row, see above): the
                        # layer's public lora_A / lora_B ModuleDict entries are swapped, and put back
                        modules[role] = RowSelectLinear(stacked, self._index)
            yield
        finally:
            for modules, role, plain in reversed(saved):
                modules[role] = plain
            self._index.set(None)

    @contextlib.contextmanager
    def rows(self, index: torch.Tensor) -> Iterator[None]:
        """Row ``i`` of the batch run inside uses model ``index[i]`` (a 1-D long tensor)."""
        self._index.set(index.to(self.device))
        try:
            yield
        finally:
            self._index.set(None)


def _all_equal(tensors: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    first = tensors[0]
    return all(
        set(t) == set(first) and all(torch.equal(t[k], first[k]) for k in first) for t in tensors[1:]
    )
