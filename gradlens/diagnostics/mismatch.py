"""Training–inference mismatch: the inference engine's μ against the training pass's π_old.

Both are log-probs of the same sampled tokens at the same parameters θ_old; they differ only in
how they were computed (precision, kernels, incremental decoding with a cache against one full
forward). Over the completion tokens, with Δ = log π_old(y) − log μ(y) and ρ = e^Δ:

    mean |Δ|, RMS Δ, max |Δ|      nats; users.md: ~0.002 RMS at an fp32 floor, ~0.03 in bf16
    k1 = mean(−Δ)                 estimates KL(μ‖π_old) from y ~ μ (can be negative)
    k3 = mean(ρ − 1 − Δ)          the same KL, always ≥ 0 (losses.md §7.2)
    quantiles of ρ                what TIS/MIS/IcePop truncate (losses.md §8)
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num, quantiles
from gradlens.results import Mismatch, RolloutStats


def rollout_stats(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> RolloutStats:
    """Statistics of ρ = exp(ℓ_old − ℓ_rollout) over the valid tokens."""
    log_rho = (old_logp.double() - rollout_logp.double())[mask]  # [M]
    finite = torch.isfinite(log_rho)
    log_rho = log_rho[finite]
    if log_rho.numel() == 0:
        return RolloutStats(
            count=0,
            rho_mean=None,
            rho_min=None,
            rho_max=None,
            kl_k1=None,
            kl_k3=None,
            abs_diff_mean=None,
            abs_diff_max=None,
        )
    rho = log_rho.exp()
    p01, p05, p50, p95, p99 = quantiles(rho, (0.01, 0.05, 0.5, 0.95, 0.99))
    return RolloutStats(
        count=int(log_rho.numel()),
        rho_mean=num(rho.mean()),
        rho_min=num(rho.min()),
        rho_max=num(rho.max()),
        kl_k1=num((-log_rho).mean()),
        kl_k3=num((rho - 1 - log_rho).mean()),
        abs_diff_mean=num(log_rho.abs().mean()),
        abs_diff_max=num(log_rho.abs().max()),
        rms_diff=num(log_rho.pow(2).mean().sqrt()),
        rho_p01=p01,
        rho_p05=p05,
        rho_p50=p50,
        rho_p95=p95,
        rho_p99=p99,
    )


def mismatch_stats(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, rollout_dtype: str, train_dtype: str
) -> Mismatch:
    """`rollout_stats` with the precisions of the two passes (the model source's section)."""
    stats = rollout_stats(old_logp, rollout_logp, mask)
    return Mismatch(**stats.model_dump(), rollout_dtype=rollout_dtype, train_dtype=train_dtype)
