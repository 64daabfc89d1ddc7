"""Text and vision behind one interface (:class:`~fedblend.modalities.base.Modality`)."""

from __future__ import annotations

from fedblend.config import VISION_ALGORITHMS, ExperimentConfig
from fedblend.modalities.base import Evaluation, Modality, Prepared

__all__ = ["Evaluation", "Modality", "Prepared", "modality_for"]


def modality_for(cfg: ExperimentConfig) -> Modality:
    """The modality of ``cfg``'s algorithm (vision algorithms: vision; the rest: text)."""
    if cfg.algorithm in VISION_ALGORITHMS:
        from fedblend.modalities.vision import VisionModality

        return VisionModality(cfg)
    from fedblend.modalities.text import TextModality

    return TextModality(cfg)
