"""A per-layer, per-token router between two LoRA roles (FedALT's adaptive mixer).

In every adapted layer a router ``G`` (``nn.Linear(d_in, 2, bias=False)``, Kaiming init as
PyTorch's Linear) weighs two roles of a :class:`~fedblend.adapters.lora.DualLoRA` token by token:

    g = softmax(G x)        h = W0 x + s [g_0 B_0 A_0 x + g_1 B_1 A_1 x]

It is PEFT's own LoRA forward with the roles' scaling multiplied by ``g``: a forward pre-hook
on each ``LoraLayer`` computes ``g`` from the layer input (shape ``(batch, seq, 2)``) and sets
``scaling[role]`` to the scaling the DualLoRA mixing put there times ``g_k`` (``(batch, seq,
1)``, broadcast over the output features); a forward hook puts the mixing's scaling back. So
the DualLoRA mixing weights still apply (they multiply ``g``), and outside the router's layers
nothing changes. Generation with a KV cache routes each new token by its own input.

The router's tensors are attached to the DualLoRA under their own role (``router``, keys
``<layer>.router.weight``): ``get`` / ``set`` / checkpoints / evaluation's ``load_into``
handle them like an adapter's, while they never join the LoRA roles (not exported as PEFT
adapters, not row-selected by cross-client batched evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from peft.tuners.lora import LoraLayer

from fedblend.adapters.lora import DualLoRA

ROUTER = "router"
SUFFIX = ".router.weight"


def route(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``softmax(G x)`` over the last dimension: ``(..., d_in) -> (..., k)`` in float32."""
    return torch.softmax(torch.nn.functional.linear(x.to(torch.float32), weight.to(x.device, torch.float32)), dim=-1)


class TokenRouter:
    """Routers on every LoRA layer of ``adapters``, mixing ``roles`` (in that order: ``g_0``
    weighs ``roles[0]``). Created by :func:`router_for` (one per DualLoRA)."""

    def __init__(self, adapters: DualLoRA, roles: Sequence[str] = ("global", "local")) -> None:
        self.adapters = adapters
        self.roles = tuple(roles)
        self.weights: dict[str, torch.nn.Parameter] = {}
        self._handles: list = []
        self._saved: dict[int, dict[str, object]] = {}
        for name, layer in adapters.model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            like = layer.lora_A[self.roles[0]].weight
            w = torch.nn.Parameter(torch.zeros(len(self.roles), layer.in_features, dtype=torch.float32,
                                               device=like.device), requires_grad=False)
            self.weights[name + SUFFIX] = w
            self._handles.append(layer.register_forward_pre_hook(self._pre(w), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post()))
        adapters.attach(ROUTER, self.weights)

    def _pre(self, weight: torch.nn.Parameter):
        def hook(layer, args, kwargs):
            x = args[0] if args else kwargs["x"]
            g = route(x, weight)
            for role, s in self._saved.pop(id(layer), {}).items():  # a forward that raised midway
                layer.scaling[role] = s
            saved = {r: layer.scaling[r] for r in self.roles if r in layer.scaling}
            self._saved[id(layer)] = saved
            for k, role in enumerate(self.roles):
                if role in saved:
                    layer.scaling[role] = saved[role] * g[..., k : k + 1]

        return hook

    def _post(self):
        def hook(layer, args, output):
            for role, s in self._saved.pop(id(layer), {}).items():
                layer.scaling[role] = s

        return hook

    def fresh(self, seed: int) -> dict[str, torch.Tensor]:
        """Kaiming-uniform init of every router (``nn.Linear``'s default), drawn on the CPU with
        ``seed``; returns the tensors (CPU copies)."""
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            out = {}
            for k in sorted(self.weights):
                init = torch.empty(self.weights[k].shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(init, a=math.sqrt(5))
                out[k] = init
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.weights.values())

    def set_trainable(self, on: bool) -> None:
        for p in self.weights.values():
            p.requires_grad_(on)

    def detach(self) -> None:
        """Remove the hooks and the attached role (the model runs as before)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.adapters.params.pop(ROUTER, None)
        if getattr(self.adapters, _ATTR, None) is self:
            delattr(self.adapters, _ATTR)


_ATTR = "token_router"


def router_for(adapters: DualLoRA, roles: Sequence[str] = ("global", "local")) -> TokenRouter:
    """The :class:`TokenRouter` on ``adapters`` (created and attached on first use; kept on
    the DualLoRA itself, so it lives and goes with the model)."""
    r = getattr(adapters, _ATTR, None)
    if r is None:
        r = TokenRouter(adapters, roles)
        setattr(adapters, _ATTR, r)
    return r
