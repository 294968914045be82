"""Diagnostic 4: the PPO ratio r = π_θ(y)/π_old(y) and the KL estimates it implies.

Over the valid tokens, with log r = ℓ − ℓ_old:
    kl_k1 = mean(ℓ_old − ℓ) = mean(−log r)            verl actor/ppo_kl, OpenRLHF/slime ppo_kl
    kl_k3 = mean((r − 1) − log r)                       k3 estimator of KL(π_old ‖ π_θ) under
                                                        y ~ π_old (always ≥ 0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import count_non_finite, num, quantiles
from gradlens.results import RatioStats

QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


def ratio_stats(logp: Tensor, old_logp: Tensor, mask: Tensor) -> RatioStats:
    """Statistics of r over the valid tokens of [N, T] log-probs."""
    log_r = (logp - old_logp.to(logp.dtype))[mask].double()  # [M]
    r = log_r.exp()
    finite = torch.isfinite(r)
    p01, p05, p50, p95, p99 = quantiles(r, QUANTILES)
    rf = r[finite]
    empty = rf.numel() == 0
    return RatioStats(
        count=int(r.numel()),
        non_finite=count_non_finite(r),
        mean=None if empty else num(rf.mean()),
        min=None if empty else num(rf.min()),
        p01=p01,
        p05=p05,
        p50=p50,
        p95=p95,
        p99=p99,
        max=None if empty else num(rf.max()),
        kl_k1=None if empty else num((-log_r[finite]).mean()),
        kl_k3=None if empty else num((rf - 1 - log_r[finite]).mean()),
    )
