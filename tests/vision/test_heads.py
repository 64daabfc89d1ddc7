"""Adapters, losses and the conditional feature GAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedblend.algorithms.tripleplay import top_up_counts
from fedblend.vision.heads import (
    AttentionAdapter,
    Discriminator,
    Generator,
    balanced_softmax_loss,
    contrastive_loss,
    train_gan,
)


def test_attention_adapter_is_softmax_gate_times_features():
    torch.manual_seed(0)
    a = AttentionAdapter(8)
    f = torch.randn(3, 8)
    g = torch.softmax(a.fc2(torch.tanh(a.fc1(f))), dim=-1)
    assert torch.allclose(g.sum(-1), torch.ones(3))
    assert torch.allclose(a(f), g * f)


def test_balanced_softmax_shifts_towards_rare_classes():
    logits = torch.zeros(1, 3, requires_grad=True)
    y = torch.tensor([2])
    counts = torch.tensor([100, 10, 1])
    balanced_softmax_loss(logits, y, counts).backward()
    g_bal = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, y).backward()
    # the rare true class gets a stronger push up than under plain CE
    assert g_bal[0, 2] < logits.grad[0, 2]


def test_contrastive_loss_prefers_matching_classes():
    w = F.normalize(torch.eye(3), dim=-1)
    y = torch.tensor([0, 1, 2, 0])
    good = w[y]
    bad = w[(y + 1) % 3]
    assert contrastive_loss(good, w, y, 10.0) < contrastive_loss(bad, w, y, 10.0)


def test_top_up_fills_missing_and_rare_classes():
    need = top_up_counts(torch.tensor([10, 2, 0, 0]), target=0.5, cap=100)
    assert need.tolist() == [0, 3, 5, 5]
    capped = top_up_counts(torch.tensor([10, 0, 0, 0]), target=1.0, cap=6)
    assert int(capped.sum()) <= 6


def test_generator_features_are_class_conditioned():
    torch.manual_seed(0)
    classes, dim = 4, 16
    centers = F.normalize(torch.randn(classes, dim), dim=-1) * 3
    y = torch.arange(classes).repeat_interleave(64)
    real = F.normalize(centers[y] + 0.3 * torch.randn(len(y), dim), dim=-1)
    # the frozen classifier: nearest class mean of the real features
    means = F.normalize(torch.stack([real[y == c].mean(0) for c in range(classes)]), dim=-1)
    assert ((real @ means.T).argmax(1) == y).float().mean() > 0.95
    gen = Generator(8, classes, 64, dim)
    disc = Discriminator(dim, classes, 64)
    probe_y = torch.arange(classes).repeat_interleave(50)
    before = ((gen.sample(probe_y, 1) @ means.T).argmax(1) == probe_y).float().mean()
    train_gan(gen, disc, real, y, steps=300, lr=2e-3, seed=0)
    acc = ((gen.sample(probe_y, 1) @ means.T).argmax(1) == probe_y).float().mean()
    assert acc > 0.8, (float(before), float(acc))  # chance is 0.25
