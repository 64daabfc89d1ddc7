"""The algorithm registry: one line per method, ``name -> "module:Class"``.

Each method is one module under :mod:`fedblend.algorithms`; its class (a subclass of
:class:`~fedblend.algorithms.base.Algorithm`) declares its name, modality, shared roles, its
own settings section (``section`` + a pydantic ``Settings`` model) and the settings it refuses
(``check``). Nothing else in fedblend tests algorithm names: the config, the runner, the
modalities and the comparison commands ask this registry. Modules are imported when first
asked for, so loading a config imports only its algorithm's module.

A new method (see docs/adding-an-algorithm.md): write ``algorithms/<name>.py`` and add its
line to ``_REGISTRY`` below, or call :func:`register` from your own package.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from fedblend.errors import ConfigError

if TYPE_CHECKING:
    from fedblend.algorithms.base import Algorithm
    from fedblend.config import ExperimentConfig

_REGISTRY: dict[str, str] = {
    # text (FedDPA's paper and its baselines)
    "local": "fedblend.algorithms.local:Local",
    "fedit": "fedblend.algorithms.fedit:FedIT",
    "centralized": "fedblend.algorithms.fedit:Centralized",
    "feddpa_t": "fedblend.algorithms.feddpa:FedDPAT",
    "feddpa_f": "fedblend.algorithms.feddpa:FedDPAF",
    "fedsa_lora": "fedblend.algorithms.fedsa_lora:FedSALoRA",
    "ffa_lora": "fedblend.algorithms.ffa_lora:FFALoRA",
    "fedalt": "fedblend.algorithms.fedalt:FedALT",
    "scaffold": "fedblend.algorithms.scaffold:Scaffold",
    "flexlora": "fedblend.algorithms.flexlora:FlexLoRA",
    "hetlora": "fedblend.algorithms.hetlora:HetLoRA",
    "flora": "fedblend.algorithms.flora:FLoRA",
    "fedex_lora": "fedblend.algorithms.fedex_lora:FedExLoRA",
    # vision (TriplePlay's paper and its baselines)
    "zeroshot": "fedblend.algorithms.fedclip:ZeroShot",
    "linear_probe": "fedblend.algorithms.fedclip:LinearProbe",
    "fedclip": "fedblend.algorithms.fedclip:FedCLIP",
    "fedavg_adapter": "fedblend.algorithms.fedclip:FedAvgAdapter",
    "fedprox": "fedblend.algorithms.fedclip:FedProx",
    "local_adapter": "fedblend.algorithms.fedclip:LocalAdapter",
    "tripleplay": "fedblend.algorithms.tripleplay:TriplePlay",
}


def register(name: str, target: str) -> None:
    """Register ``"package.module:Class"`` under ``name`` (a plugin, or a test's toy method)."""
    _REGISTRY[name] = target
    algorithm_class.cache_clear()
    _sections.cache_clear()


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    algorithm_class.cache_clear()
    _sections.cache_clear()


def names(modality: str | None = None) -> list[str]:
    """Registered algorithm names (of one modality when given), in registry order."""
    if modality is None:
        return list(_REGISTRY)
    return [n for n in _REGISTRY if algorithm_class(n).modality == modality]


@cache
def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered under ``name`` (its module imported on first use)."""
    target = _REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"algorithm: {name!r} is not available in this build")
    module, cls = target.split(":")
    algo = getattr(importlib.import_module(module), cls)
    if algo.name != name:
        raise ConfigError(f"algorithm: {target} declares name {algo.name!r}, registered as {name!r}")
    return algo


def sections() -> dict[str, type]:
    """Every settings section a registered algorithm declares: ``{section: Settings}``."""
    return dict(_sections())


@cache
def _sections() -> dict[str, type]:
    out: dict[str, type] = {}
    for n in _REGISTRY:
        algo = algorithm_class(n)
        if algo.section:
            if algo.section in out and out[algo.section] is not algo.Settings:
                raise ConfigError(f"algorithm: two settings models declare section [{algo.section}]")
            out[algo.section] = algo.Settings
    return out


def make_algorithm(cfg: ExperimentConfig) -> Algorithm:
    """The configured algorithm, wrapped with the trust features the config turns on."""
    from fedblend.algorithms.wrappers import wrap_algorithm

    return wrap_algorithm(algorithm_class(cfg.algorithm)(cfg), cfg)
