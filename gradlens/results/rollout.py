"""The training–inference gap of a batch: ρ = π_old(y)/μ_old(y) over its valid tokens."""

from __future__ import annotations

from pydantic import Field

from gradlens.results.base import Result


class RolloutStats(Result):
    """The training–inference gap ρ = π_old(y)/μ_old(y), when the batch has rollout log-probs."""

    count: int
    rho_mean: float | None = Field(description="mean ρ; verl rollout_corr/rollout_is_mean")
    rho_min: float | None
    rho_max: float | None
    kl_k1: float | None = Field(
        description="mean(ℓ_rollout − ℓ_old); verl rollout_corr/kl, OpenRLHF vllm_kl"
    )
    kl_k3: float | None = Field(description="mean(ρ − 1 − log ρ); verl rollout_corr/k3_kl")
    abs_diff_mean: float | None = Field(
        description="mean |ℓ_old − ℓ_rollout|; TRL sampling/sampling_logp_difference/mean, "
        "slime train_rollout_logprob_abs_diff"
    )
    abs_diff_max: float | None = Field(
        description="max |ℓ_old − ℓ_rollout|; TRL sampling/sampling_logp_difference/max"
    )
    rms_diff: float | None = Field(None, description="sqrt(mean (ℓ_old − ℓ_rollout)²), nats")
    rho_p01: float | None = None
    rho_p05: float | None = None
    rho_p50: float | None = None
    rho_p95: float | None = None
    rho_p99: float | None = None
