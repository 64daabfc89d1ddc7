"""Centralized reference rows on the same frozen features as a federated vision run.

- ``linear_probe``: multinomial logistic regression (L-BFGS, L2 picked on a 10% held-out
  split of the training features) on standardised features, trained on the pooled training
  features of every client; the natural upper reference for anything trained after a
  frozen backbone.
- ``centralized_adapter``: the config's own adapter + head + loss (``trainer.train``), trained
  on the same pooled features for ``vision.reference_epochs`` epochs.

Both are scored on the global test set, overall and per class group (head / medium / tail).
They need the features in memory, so they run only with the frozen-feature cache (cheap
there: seconds); ``vision.reference = false`` turns them off.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedblend.config import ExperimentConfig
from fedblend.vision.trainer import Shard, VisionTrainer

ROLE = "reference"
L2_GRID = (1e-4, 1e-3, 1e-2)


def _accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[int] | None = None) -> float | None:
    mask = torch.ones_like(y, dtype=torch.bool) if classes is None else torch.isin(y, torch.tensor(classes))
    return float((pred[mask] == y[mask]).float().mean()) if bool(mask.any()) else None


def _scores(pred: torch.Tensor, y: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float | None]:
    return {"overall": _accuracy(pred, y), **{g: _accuracy(pred, y, cls) for g, cls in groups.items()}}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float,
                 iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch multinomial logistic regression (L-BFGS); returns weight [C, D] and bias [C]."""
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 / 2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 n_classes: int, seed: int) -> tuple[torch.Tensor, float]:
    """Predictions on ``test_x`` and the L2 weight chosen on a seeded 10% held-out split."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, tx = (train_x - mu) / sd, (test_x - mu) / sd
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(x) // 10)
    val, fit = perm[:n_val], perm[n_val:]
    best, best_acc = L2_GRID[0], -1.0
    if len(fit) >= n_classes:
        for l2 in L2_GRID:
            w, b = fit_logistic(x[fit], train_y[fit], n_classes, l2)
            acc = float(((x[val] @ w.T + b).argmax(1) == train_y[val]).float().mean())
            if acc > best_acc:
                best, best_acc = l2, acc
    w, b = fit_logistic(x, train_y, n_classes, best)
    return (tx @ w.T + b).argmax(1), best


def centralized_adapter(trainer: VisionTrainer, pooled: Shard, test: Shard, epochs: int,
                        seed: int) -> torch.Tensor | None:
    """The config's adapter + head + loss, trained on the pooled features; test predictions
    (None when nothing is trainable, e.g. zero-shot)."""
    if not trainer.new_model().trainable():
        return None
    store = trainer.adapters
    try:
        store.fresh(ROLE, seed)
        trainer.train(ROLE, pooled, epochs, seed)
        return trainer.predict({ROLE: 1.0}, {ROLE: store.get(ROLE)}, test)
    finally:
        store.state.pop(ROLE, None)  # not a role of the federated run


def reference_accuracies(cfg: ExperimentConfig, trainer: VisionTrainer, train: Sequence[Shard],
                         test: Shard, groups: dict[str, list[int]]) -> dict[str, Any] | None:
    """``accuracy.reference`` of a vision run, or None (switched off, or no feature cache)."""
    if not cfg.vision.reference or not trainer.use_cache or not train:
        return None
    t0 = time.perf_counter()
    x = torch.cat([trainer.all_features(s) for s in train])
    y = torch.cat([s.labels for s in train])
    pooled = Shard([e for s in train for e in s.examples], y, feats=x)
    probe_pred, l2 = linear_probe(x, y, trainer.all_features(test), trainer.n_classes, cfg.seed)
    t1 = time.perf_counter()
    adapter_pred = centralized_adapter(trainer, pooled, test, cfg.vision.reference_epochs, cfg.seed)
    t2 = time.perf_counter()
    probe = _scores(probe_pred, test.labels, groups)
    adapter = _scores(adapter_pred, test.labels, groups) if adapter_pred is not None else {"overall": None}
    return {
        "linear_probe": probe["overall"],
        "centralized_adapter": adapter["overall"],
        "groups": {"linear_probe": probe, "centralized_adapter": adapter},
        "train_examples": len(y),
        "probe_l2": l2,
        "adapter_epochs": cfg.vision.reference_epochs,
        "seconds": {"linear_probe": t1 - t0, "centralized_adapter": t2 - t1},
    }
