"""Client-level DP with fixed clipping, the recipe of Flower's central-DP wrappers
(``DifferentialPrivacyServerSideFixedClipping``): every client's shared delta is clipped to
``privacy.clip`` (client side); the server takes the unweighted mean of the clipped deltas
and adds Gaussian noise with std ``noise_multiplier * clip / num_sampled``.

Epsilon comes from Google's ``dp-accounting`` RDP accountant: each aggregated round is a
Poisson-sampled Gaussian mechanism with ``sample_rate = clients_per_round / num_clients``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedblend.comm.codec import State

ACCOUNTANT = "dp_accounting.rdp.RdpAccountant (Poisson-sampled Gaussian)"


def noise_std(noise_multiplier: float, clip: float, num_sampled: int) -> float:
    return noise_multiplier * clip / max(1, num_sampled)


def add_noise(delta: State, std: float, generator: torch.Generator) -> State:
    """``delta`` plus N(0, std^2) on every coordinate (in a fixed role/name order)."""
    out: State = {}
    for r in sorted(delta):
        out[r] = {}
        for k in sorted(delta[r]):
            t = delta[r][k]
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
            out[r][k] = (t.to(torch.float64) + noise).to(t.dtype)
    return out


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after ``rounds`` releases; inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds,
    )
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def privacy_record(cfg: Any, num_clients: int, rounds: int) -> dict[str, Any]:
    """The ``privacy`` entry of metrics.jsonl and summary.json after ``rounds`` releases."""
    p = cfg.privacy
    k = cfg.train.clients_per_round
    rate = 1.0 if k <= 0 or k >= num_clients else k / num_clients
    eps = epsilon(p.noise_multiplier, rate, rounds, p.delta)
    return {"epsilon": eps if eps != float("inf") else None, "delta": p.delta,
            "noise_multiplier": p.noise_multiplier, "clip": p.clip, "sample_rate": rate,
            "rounds": rounds, "accountant": ACCOUNTANT}
