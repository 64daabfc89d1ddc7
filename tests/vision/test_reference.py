"""Centralized reference rows (linear probe, centralized adapter) and federated feature
standardisation, on small real tensors."""

from __future__ import annotations

import torch

from fedblend.aggregation.fedavg import weighted_mean
from fedblend.vision.heads import FeatureModel
from fedblend.vision.reference import fit_logistic, linear_probe


def _blobs(n_per_class: int, classes: int, dim: int, seed: int, offset: float = 5.0):
    """Non-negative features with a large shared offset (like pooled ReLU features) and a
    small class-dependent part: the case where centring matters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = offset + 0.5 * centers[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y


def test_linear_probe_separates_separable_classes_and_picks_an_l2():
    x, y = _blobs(40, 4, 16, seed=1)
    tx, ty = _blobs(20, 4, 16, seed=2)
    pred, l2 = linear_probe(x, y, tx, 4, seed=0)
    assert float((pred == ty).float().mean()) > 0.95
    assert l2 > 0
    w, b = fit_logistic(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), 3, 1e-3)
    assert torch.allclose(w, torch.zeros_like(w)) and torch.allclose(b, torch.zeros_like(b), atol=1e-4)


def test_standardisation_statistics_average_to_the_pooled_ones():
    """Each client measures mean / mean square of its unit-norm features; FedAvg weighted by
    example count gives exactly the pooled statistics."""
    x, _ = _blobs(30, 3, 8, seed=3)
    parts = [x[:10], x[10:70], x[70:]]
    models = []
    for p in parts:
        m = FeatureModel(8, 3, "residual", "cosine", 10.0, None, reduction=2, standardize=True)
        assert not m.has_stats
        m.set_stats(p)
        models.append(({k: v.detach() for k, v in m.trainable().items()}, len(p)))
    avg = weighted_mean(models)
    pooled = FeatureModel(8, 3, "residual", "cosine", 10.0, None, reduction=2, standardize=True)
    pooled.set_stats(x)
    assert torch.allclose(avg["norm_mean"], pooled.norm_mean, atol=1e-6)
    assert torch.allclose(avg["norm_sq"], pooled.norm_sq, atol=1e-6)
    # standardised embeddings are centred: their mean cosine drops far below the raw one's
    raw = FeatureModel(8, 3, "none", "cosine", 10.0, None)
    std_model = FeatureModel(8, 3, "none", "cosine", 10.0, None, standardize=True)
    std_model.set_stats(x)
    z_raw, z_std = raw.embed(x), std_model.embed(x)
    assert float((z_raw @ z_raw.T).mean()) > 0.9
    assert abs(float((z_std @ z_std.T).mean())) < 0.1


def test_federated_standardisation_pools_the_clients_statistics(tmp_path, tiny_clip_dir):
    """After one FedAvg round the global model carries the statistics of all clients' unit-norm
    training features pooled (measured locally, averaged by example count)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from fedblend.runner import run_experiment
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.federation import build_image_federation
    from fedblend.vision.trainer import VisionTrainer

    from .conftest import vision_cfg

    cfg = vision_cfg(head="cosine", feature_norm="standardize", path=str(tiny_clip_dir),
                     cache_dir=str(tmp_path / "cache"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rounds": 1})})
    s = run_experiment(cfg, tmp_path / "run")
    assert s["accuracy"]["reference"]["centralized_adapter"] is not None
    got = load_file(str(tmp_path / "run" / "adapters" / "global" / "adapter.safetensors"))
    fed = build_image_federation(cfg)
    tr = VisionTrainer(cfg, load_backbone(cfg.vision, fed.class_names, cfg.seed), len(fed.class_names))
    g = F.normalize(torch.cat([tr.shard(c.train).feats for c in fed.clients]), dim=-1)
    assert tr.cache.misses == 0  # the run's cached features
    assert torch.allclose(got["norm_mean"], g.mean(0), atol=1e-5)
    assert torch.allclose(got["norm_sq"], (g**2).mean(0), atol=1e-5)


def test_standardisation_with_clip_text_head_is_a_config_error(tiny_clip_dir):
    import pytest

    from fedblend.errors import ConfigError
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.trainer import VisionTrainer

    from .conftest import vision_cfg

    cfg = vision_cfg(feature_norm="standardize", path=str(tiny_clip_dir), cache_dir="")
    with pytest.raises(ConfigError, match="vision.feature_norm: 'standardize'"):
        VisionTrainer(cfg, load_backbone(cfg.vision, cfg.vision.class_names, 0), 4)
