"""Label-skew levers of the vision algorithms: the FedAvgM server step (train.server_lr,
train.server_momentum) and the fixed, shared-seed head (vision.train_head = false)."""

from __future__ import annotations

import pytest
import torch

from fedblend.algorithms.base import MOMENTUM, server_step
from fedblend.algorithms.fedclip import FedCLIP
from fedblend.comm.codec import Message
from fedblend.config import config_from_dict


def test_server_step_is_fedavgm_and_leaves_the_statistics_averaged():
    old = {"w": torch.tensor([1.0, 2.0]), "norm_mean": torch.tensor([0.0, 0.0])}
    avg1 = {"w": torch.tensor([2.0, 0.0]), "norm_mean": torch.tensor([0.5, 0.1])}
    stats = frozenset({"norm_mean"})
    new1, m1 = server_step(old, avg1, None, lr=0.5, beta=0.9, plain=stats)
    # d = avg - old = [1, -2]; m = d; new = old + 0.5 m
    assert torch.allclose(m1["w"], torch.tensor([1.0, -2.0]))
    assert torch.allclose(new1["w"], torch.tensor([1.5, 1.0]))
    assert torch.equal(new1["norm_mean"], avg1["norm_mean"]) and "norm_mean" not in m1
    avg2 = {"w": torch.tensor([1.5, 2.0]), "norm_mean": torch.tensor([0.4, 0.2])}
    new2, m2 = server_step(new1, avg2, m1, lr=0.5, beta=0.9, plain=stats)
    # d = [0, 1]; m = 0.9 [1, -2] + [0, 1] = [0.9, -0.8]; new = [1.5, 1] + 0.5 m
    assert torch.allclose(m2["w"], torch.tensor([0.9, -0.8]))
    assert torch.allclose(new2["w"], torch.tensor([1.95, 0.6]))
    # lr 1, beta 0 is plain FedAvg
    plain, none = server_step(old, avg1, None, lr=1.0, beta=0.0)
    assert none is None and torch.equal(plain["w"], avg1["w"])


def _algo(**train) -> FedCLIP:
    return FedCLIP(config_from_dict({"algorithm": "fedclip", "train": train}))


def _updates(*vals: tuple[float, int]) -> dict[int, Message]:
    return {i: Message({"global": {"w": torch.tensor([v])}}, n) for i, (v, n) in enumerate(vals)}


def test_fedclip_aggregate_keeps_the_momentum_on_the_server_only():
    algo = _algo(server_momentum=0.5)
    state = {"global": {"w": torch.tensor([0.0])}}
    s1 = algo.aggregate(0, _updates((1.0, 1), (3.0, 3)), state)  # FedAvg 2.5 -> d 2.5
    assert torch.allclose(s1["global"]["w"], torch.tensor([2.5]))
    s2 = algo.aggregate(1, _updates((2.5, 1)), s1)  # d 0 -> m 1.25
    assert torch.allclose(s2[MOMENTUM + "global"]["w"], torch.tensor([1.25]))
    assert torch.allclose(s2["global"]["w"], torch.tensor([3.75]))
    sent = algo.configure_round(2, s2, [0])[0].tensors
    assert list(sent) == ["global"]  # the buffer never travels
    # the defaults are plain FedAvg with no extra state
    s = _algo().aggregate(0, _updates((1.0, 1), (3.0, 3)), state)
    assert torch.allclose(s["global"]["w"], torch.tensor([2.5])) and list(s) == ["global"]


def test_fixed_head_trains_only_the_adapter(tiny_clip_dir):
    from fedblend.errors import ConfigError
    from fedblend.vision.backbones import load_backbone
    from fedblend.vision.federation import build_image_federation
    from fedblend.vision.trainer import VisionTrainer

    from .conftest import vision_cfg

    cfg = vision_cfg(head="cosine", adapter="residual", train_head=False, path=str(tiny_clip_dir),
                     cache_dir="")
    fed = build_image_federation(cfg)
    tr = VisionTrainer(cfg, load_backbone(cfg.vision, fed.class_names, 0), len(fed.class_names))
    before = tr.adapters.fresh("global", 0)
    tr.train("global", tr.shard(fed.clients[0].train), 1, seed=0)
    after = tr.adapters.get("global")
    assert torch.equal(before["prototypes"], after["prototypes"])
    assert not torch.equal(before["adapter.mlp.0.weight"], after["adapter.mlp.0.weight"])
    with pytest.raises(ConfigError, match="vision.train_head"):
        VisionTrainer(vision_cfg(head="cosine", adapter="none", train_head=False,
                                 path=str(tiny_clip_dir), cache_dir=""),
                      tr.backbone, len(fed.class_names))
