"""Trainable parts after the frozen backbone: adapters, heads, and the conditional feature GAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAdapter(nn.Module):
    """FedCLIP / TriplePlay: ``g = softmax(W2 tanh(W1 f))``, ``f' = g * f`` (elementwise)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(f))), dim=-1) * f


class ResidualAdapter(nn.Module):
    """CLIP-Adapter: ``f' = alpha * MLP(f) + (1 - alpha) * f`` with a bottleneck MLP."""

    def __init__(self, dim: int, reduction: int, alpha: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.alpha = alpha

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.mlp(f) + (1 - self.alpha) * f


STATS = ("norm_mean", "norm_sq")  # feature standardisation statistics (travel, not trained)


class FeatureModel(nn.Module):
    """[standardise ->] adapter -> L2 norm -> head. Heads: ``text`` (cosine to frozen
    class-prompt features), ``cosine`` (learned class prototypes), ``linear``. Only trainable
    tensors (and the standardisation statistics) travel.

    Standardisation (``standardize``): the unit-norm feature is centred and scaled per
    dimension by ``norm_mean`` / ``norm_sq`` (mean and mean square of unit-norm training
    features), then re-normalised. All zero = not yet measured = no standardisation.
    """

    def __init__(self, dim: int, n_classes: int, adapter: str, head: str, scale: float,
                 text: torch.Tensor | None, reduction: int = 4, alpha: float = 0.2,
                 standardize: bool = False) -> None:
        super().__init__()
        self.standardize = standardize
        if standardize:
            self.norm_mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
            self.norm_sq = nn.Parameter(torch.zeros(dim), requires_grad=False)
        if adapter == "attention":
            self.adapter: nn.Module = AttentionAdapter(dim)
        elif adapter == "residual":
            self.adapter = ResidualAdapter(dim, reduction, alpha)
        else:
            self.adapter = nn.Identity()
        self.head_kind = head
        self.scale = scale
        if head == "text":
            assert text is not None
            self.register_buffer("text", text.clone(), persistent=False)
        elif head == "cosine":
            self.prototypes = nn.Parameter(torch.randn(n_classes, dim) / dim**0.5)
        else:
            self.linear = nn.Linear(dim, n_classes)

    @property
    def has_stats(self) -> bool:
        return self.standardize and bool(self.norm_sq.any())

    @torch.no_grad()
    def set_stats(self, feats: torch.Tensor) -> None:
        """Measure the standardisation statistics on (raw) training features."""
        g = F.normalize(feats, dim=-1)
        self.norm_mean.copy_(g.mean(0))
        self.norm_sq.copy_((g**2).mean(0))

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        g = F.normalize(f, dim=-1)
        if self.has_stats:
            std = (self.norm_sq - self.norm_mean**2).clamp_min(1e-12).sqrt()
            g = F.normalize((g - self.norm_mean) / std, dim=-1)
        return F.normalize(self.adapter(g), dim=-1)

    def class_weights(self) -> torch.Tensor:
        return self.text if self.head_kind == "text" else F.normalize(self.prototypes, dim=-1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = self.embed(f)
        if self.head_kind == "linear":
            return self.linear(z)
        return self.scale * z @ self.class_weights().T

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad or n in STATS}


def contrastive_loss(z: torch.Tensor, class_w: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP's symmetric loss between image embeddings and their class-prompt embeddings; pairs
    with the same class count as positives (soft targets), so duplicates are not negatives."""
    t = class_w[y]
    logits = scale * z @ t.T
    same = (y[:, None] == y[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    li = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (li + lt) / 2


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Balanced softmax (Ren et al. 2020): CE on ``logits + log prior``; absent classes get a
    tiny prior, so the client's own skew is not baked into the shared model."""
    prior = (counts.float() + 1e-2) / (counts.sum() + 1e-2 * len(counts))
    return F.cross_entropy(logits + prior.log(), y)


# ---- conditional feature GAN (AC-GAN in the frozen, unit-norm feature space) ------------------
class Generator(nn.Module):
    def __init__(self, noise_dim: int, n_classes: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.noise_dim, self.n_classes = noise_dim, n_classes
        self.embed = nn.Embedding(n_classes, noise_dim)
        self.net = nn.Sequential(nn.Linear(2 * noise_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(torch.cat([z, self.embed(y)], dim=1)), dim=-1)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self(torch.randn(len(y), self.noise_dim, generator=g), y)


class Discriminator(nn.Module):
    """Real/fake logit plus class logits (the auxiliary classifier conditions the generator)."""

    def __init__(self, dim: int, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2))
        self.adv = nn.Linear(hidden, 1)
        self.cls = nn.Linear(hidden, n_classes)
        self.dim = dim

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(f * self.dim**0.5)
        return self.adv(h).squeeze(-1), self.cls(h)


def train_gan(gen: Generator, disc: Discriminator, feats: torch.Tensor, labels: torch.Tensor,
              steps: int, lr: float, seed: int, batch: int = 64) -> dict[str, float]:
    """Local AC-GAN steps on unit-norm real features; generator labels follow the local data."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(feats, dim=-1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits
    ld = lg = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(len(feats), (min(batch, len(feats)),), generator=g)
        real, y = feats[idx], labels[idx]
        z = torch.randn(len(idx), gen.noise_dim, generator=g)
        fake = gen(z, y)
        adv_r, cls_r = disc(real)
        adv_f, _ = disc(fake.detach())
        ld = bce(adv_r, torch.ones_like(adv_r)) + bce(adv_f, torch.zeros_like(adv_f)) + F.cross_entropy(cls_r, y)
        opt_d.zero_grad()
        ld.backward()
        opt_d.step()
        adv_f, cls_f = disc(fake)
        lg = bce(adv_f, torch.ones_like(adv_f)) + F.cross_entropy(cls_f, y)
        # feature matching to the class mean keeps the samples on the real class manifold
        lg = lg + (fake.mean(0) - real.mean(0)).pow(2).sum() * 10
        opt_g.zero_grad()
        lg.backward()
        opt_g.step()
    return {"gan_d_loss": ld.item(), "gan_g_loss": lg.item()}
