"""Federated algorithms, one file per method, behind the hooks in :mod:`.base`."""

from __future__ import annotations

from fedblend.algorithms.base import Algorithm
from fedblend.config import ExperimentConfig
from fedblend.errors import ConfigError

_REGISTRY: dict[str, str] = {
    "local": "fedblend.algorithms.local:Local",
    "fedit": "fedblend.algorithms.fedit:FedIT",
    "centralized": "fedblend.algorithms.fedit:Centralized",
    "feddpa_t": "fedblend.algorithms.feddpa:FedDPAT",
    "feddpa_f": "fedblend.algorithms.feddpa:FedDPAF",
    "fedsa_lora": "fedblend.algorithms.fedsa_lora:FedSALoRA",
    "ffa_lora": "fedblend.algorithms.ffa_lora:FFALoRA",
}


def register(name: str, target: str) -> None:
    """Register ``module:Class`` under ``name`` (used by the vision and FedDPA modules)."""
    _REGISTRY[name] = target


def make_algorithm(cfg: ExperimentConfig) -> Algorithm:
    import importlib

    target = _REGISTRY.get(cfg.algorithm)
    if target is None:
        raise ConfigError(f"algorithm: {cfg.algorithm!r} is not available in this build")
    from fedblend.algorithms.wrappers import wrap_algorithm

    module, cls = target.split(":")
    return wrap_algorithm(getattr(importlib.import_module(module), cls)(cfg), cfg)

for _name, _target in {
    "zeroshot": "fedblend.algorithms.fedclip:ZeroShot",
    "linear_probe": "fedblend.algorithms.fedclip:LinearProbe",
    "fedclip": "fedblend.algorithms.fedclip:FedCLIP",
    "fedavg_adapter": "fedblend.algorithms.fedclip:FedAvgAdapter",
    "fedprox": "fedblend.algorithms.fedclip:FedProx",
    "local_adapter": "fedblend.algorithms.fedclip:LocalAdapter",
    "tripleplay": "fedblend.algorithms.tripleplay:TriplePlay",
}.items():
    register(_name, _target)
