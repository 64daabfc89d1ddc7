"""Which modality runs a config: text and vision sit behind one interface
(:class:`fedblend.modality.Modality`), implemented in :mod:`fedblend.text.modality` and
:mod:`fedblend.vision.modality`."""

from __future__ import annotations

from fedblend.config import ExperimentConfig
from fedblend.modality import Modality


def modality_for(cfg: ExperimentConfig) -> Modality:
    """The modality of ``cfg``'s algorithm (vision algorithms: vision; the rest: text)."""
    if cfg.modality == "vision":
        from fedblend.vision.modality import VisionModality

        return VisionModality(cfg)
    from fedblend.text.modality import TextModality

    return TextModality(cfg)
