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

from torch import Tensor

from gradlens.diagnostics.metrics import rollout_stats
from gradlens.model_results import Mismatch, ModelInfo


def mismatch_stats(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, info: ModelInfo
) -> Mismatch:
    """The statistics of Δ = log π_old − log μ over the valid tokens (`rollout_stats`, with
    the precisions of the two passes)."""
    assert info.rollout_dtype is not None  # the model source always has a rollout pass
    s = rollout_stats(old_logp, rollout_logp, mask)
    return Mismatch(
        rollout_dtype=info.rollout_dtype,
        train_dtype=info.train_dtype,
        count=s.count,
        mean_abs_diff=s.abs_diff_mean,
        rms_diff=s.rms_diff,
        max_abs_diff=s.abs_diff_max,
        kl_k1=s.kl_k1,
        kl_k3=s.kl_k3,
        rho_min=s.rho_min,
        rho_p01=s.rho_p01,
        rho_p05=s.rho_p05,
        rho_p50=s.rho_p50,
        rho_p95=s.rho_p95,
        rho_p99=s.rho_p99,
        rho_max=s.rho_max,
    )
