"""Training–inference mismatch: the rollout pass's μ against the training pass's π_old.

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
from gradlens.model_results import Mismatch, ModelInfo


def mismatch_stats(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, info: ModelInfo
) -> Mismatch:
    """The statistics of Δ = log π_old − log μ over the valid tokens."""
    delta = (old_logp.double() - rollout_logp.double())[mask]  # [M]
    rho = delta.exp()
    p01, p05, p50, p95, p99 = quantiles(rho, (0.01, 0.05, 0.5, 0.95, 0.99))
    empty = delta.numel() == 0
    return Mismatch(
        rollout_dtype=info.rollout_dtype,
        train_dtype=info.train_dtype,
        count=int(delta.numel()),
        mean_abs_diff=None if empty else num(delta.abs().mean()),
        rms_diff=None if empty else num(delta.pow(2).mean().sqrt()),
        max_abs_diff=None if empty else num(delta.abs().max()),
        kl_k1=None if empty else num((-delta).mean()),
        kl_k3=None if empty else num((rho - 1 - delta).mean()),
        rho_min=None if empty else num(rho.min()),
        rho_p01=p01,
        rho_p05=p05,
        rho_p50=p50,
        rho_p95=p95,
        rho_p99=p99,
        rho_max=None if empty else num(torch.as_tensor(rho.max())),
    )
