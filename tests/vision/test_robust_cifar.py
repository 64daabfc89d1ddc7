"""The robustness claim of issue 10 at a small scale, on real CIFAR-10 features: 3 of 10
clients (Dirichlet 0.5) send sign-flipped updates scaled x10; plain FedAvg loses at least 20
accuracy points against the clean run while the coordinate-wise median and the trimmed mean
(trim_ratio 0.3: Flower cuts int(0.3 * 10) = 3 updates at each end, as many as there are
attackers) keep most of the clean accuracy.

Settings (benchmarks/results/trust.md has every rule at two seeds): the shipped CIFAR-10
levers that make honest updates agree, i.e. the residual adapter and a fixed head (only the
adapter trains, so no client drags the class prototypes of the classes it lacks), 100 images
per class, 10 rounds of 2 local epochs. ``feature_norm = "standardize"`` is left off: its
statistics travel with the adapter, and the coordinate-wise median of the clients' per-dimension
means and mean squares is zero on dimensions that only some clients' features use (856
zero-variance dimensions against 427 pooled), which are then divided by a ~0 standard
deviation: with it the median / trimmed mean lost 13.5 / 15.5 points instead of 5.5 / 4.5
(seed 0, 200 test images).

Measured at exactly these settings (seed 0, 500 test images): clean 0.384, attacked FedAvg
0.100 (-28.4 points), median 0.308 (-7.6), trimmed mean 0.306 (-7.8); seed 1: clean 0.396,
FedAvg 0.100 (-29.6), median 0.310 (-8.6), trimmed mean 0.312 (-8.4). The issue's "within 5
points" does not hold for these two rules, here or at any setting tried (benchmarks/results/
trust.md: 64 and 96 px features, 40-500 images per class, 1-2 local epochs, 6-20 rounds, lr
1e-3 to 1e-2, trained or fixed head: -4.0 to -17.3 points, never within 5 at both seeds). It
cannot by construction: when the honest deltas of a coordinate share a sign, the three flipped
ones sit below all seven of them, so the median of the ten is the mean of the 2nd and 3rd
smallest honest values and the 0.3-trimmed mean the mean of the 4 smallest, a lower quantile
whose fixed point is not FedAvg's; without the attack the same rules lose 1.6 / 1.2 points
(seed 0; 4.2 / 3.2 at seed 1), and FedAvg over the 7 honest clients alone 3.6 (1.4). So the
bound asserted for them is 10 points; Multi-Krum (-3.0 / -2.6) and FedAvg behind the norm
bound ``aggregate.max_update_norm = 15`` (-3.0 / -2.8) are what meet 5."""

from __future__ import annotations

import pytest

from fedblend.runner import run_experiment

from .conftest import CIFAR

ATTACK = {"kind": "sign_flip", "clients": [0, 1, 2], "scale": 10.0}


@pytest.mark.e2e
@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/data/cifar10 not present")
def test_robust_rules_resist_sign_flipping_clients(tmp_path):
    from fedblend.config import config_from_dict

    def acc(name: str, **sections) -> float:
        raw = {
            "algorithm": "fedavg_adapter", "seed": 0,
            "data": {"num_clients": 10, "partitioner": "dirichlet", "dirichlet_alpha": 0.5},
            "train": {"rounds": 10, "local_epochs": 2, "lr": 3e-3, "batch_size": 64},
            "engine": {"progress": False},
            "vision": {"backbone": "efficientnet_lite0", "dir": str(CIFAR), "image_size": 32,
                       "n_max": 100, "test_per_class": 50, "own_test_size": 20,
                       "adapter": "residual", "train_head": False, "reference": False,
                       "cache_dir": str(tmp_path / "cache")},
            **sections,
        }
        return run_experiment(config_from_dict(raw), tmp_path / name)["accuracy"]["overall"]

    clean = acc("clean")
    attacked = acc("fedavg", attack=ATTACK)
    median = acc("median", attack=ATTACK, aggregate={"rule": "median"})
    trimmed = acc("trimmed", attack=ATTACK, aggregate={"rule": "trimmed_mean", "trim_ratio": 0.3})
    assert clean - attacked >= 0.20, (clean, attacked)
    assert clean - median <= 0.10, (clean, median)
    assert clean - trimmed <= 0.10, (clean, trimmed)
