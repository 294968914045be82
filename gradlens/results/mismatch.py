"""The training–inference gap localised: the frameworks' statistics under their names, where in
the distribution and in the completion the gap lives, and the worst tokens one by one.

Δ_t = log π_old(y_t) − log μ(y_t), ρ_t = e^{Δ_t} (gradlens.diagnostics.gap_statistics,
mismatch_buckets, worst_tokens; docs/mismatch.md explains each number).
"""

from __future__ import annotations

from pydantic import Field

from gradlens.results.base import Result


class GapStatistics(Result):
    """The statistics frameworks log for the gap, each under its first framework's name."""

    count: int = Field(description="valid tokens with a finite Δ")
    sequences: int = Field(description="sequences with at least one such token")
    kl: float | None = Field(description="mean(ℓ_μ − ℓ_old) = mean(−Δ), k1; verl rollout_corr/kl")
    k2_kl: float | None = Field(description="mean(½Δ²), k2")
    k3_kl: float | None = Field(
        description="mean(ρ − 1 − Δ), k3; verl rollout_corr/k3_kl, NeMo RL gen_kl_error"
    )
    reverse_k3_kl: float | None = Field(
        description="mean(1/ρ − 1 + Δ), k3 with the ratio inverted; NeMo RL policy_kl_error"
    )
    js_divergence: float | None = Field(
        description="mean of ½k3(π_old/m) + ½k3(μ/m), m = (π_old + μ)/2; NeMo RL "
        "js_divergence_error"
    )
    mult_prob_error: float | None = Field(
        description="mean e^{|Δ|}; NeMo RL token_mult_prob_error (1 when equal)"
    )
    training_ppl: float | None = Field(
        description="mean over sequences of exp(−mean_t ℓ_old); verl rollout_corr/training_ppl"
    )
    rollout_ppl: float | None = Field(
        description="mean over sequences of exp(−mean_t ℓ_μ); verl rollout_corr/rollout_ppl"
    )
    training_log_ppl: float | None = Field(description="verl rollout_corr/training_log_ppl")
    rollout_log_ppl: float | None = Field(description="verl rollout_corr/rollout_log_ppl")
    log_ppl_diff: float | None = Field(
        description="mean over sequences of mean_t(ℓ_μ − ℓ_old); verl rollout_corr/log_ppl_diff"
    )
    log_ppl_abs_diff: float | None = Field(description="verl rollout_corr/log_ppl_abs_diff")
    log_ppl_diff_max: float | None = Field(description="verl rollout_corr/log_ppl_diff_max")
    log_ppl_diff_min: float | None = Field(description="verl rollout_corr/log_ppl_diff_min")
    ppl_ratio: float | None = Field(
        description="mean over sequences of exp(log_ppl_diff_i); verl rollout_corr/ppl_ratio"
    )
    chi2_token: float | None = Field(description="mean ρ² − 1; verl rollout_corr/chi2_token")
    chi2_seq: float | None = Field(
        description="mean over sequences of (Π_t ρ_t)² − 1; verl rollout_corr/chi2_seq"
    )
    ess: float | None = Field(
        description="effective sample size of the TIS weights w = min(ρ, cap), as a fraction: "
        "1/mean((w/mean w)²); verl rollout_corr/rollout_is_eff_sample_size"
    )
    ess_cap: float | None = Field(description="the cap of ess's weights")
    ess_raw: float | None = Field(description="the same of the raw ρ: (mean ρ)²/mean ρ²")
    pearson_logp: float | None = Field(description="Pearson correlation of ℓ_old and ℓ_μ")
    pearson_prob: float | None = Field(
        description="Pearson correlation of π_old and μ; verl "
        "training/rollout_actor_probs_pearson_corr"
    )
    prob_diff_mean: float | None = Field(
        description="mean |π_old − μ| (probabilities); verl training/rollout_probs_diff_mean"
    )
    prob_diff_max: float | None = Field(description="verl training/rollout_probs_diff_max")
    prob_diff_std: float | None = Field(
        description="unbiased std of |π_old − μ|; verl training/rollout_probs_diff_std"
    )
    band_low: float = Field(description="the ρ band of outside_band: low")
    band_high: float = Field(description="the ρ band of outside_band: high")
    outside_band: float | None = Field(
        description="share of tokens with ρ outside [band_low, band_high] (TRL issue 6789's "
        "[0.9, 1.1])"
    )


class MismatchBucket(Result):
    """One bucket of tokens (a π_old range, or a range of positions in the completion)."""

    label: str
    low: float = Field(description="the bucket's lower edge (inclusive)")
    high: float = Field(description="its upper edge (exclusive; the last bucket inclusive)")
    count: int
    abs_diff_mean: float | None = Field(description="mean |Δ| of its tokens")
    outside_band: float | None = Field(description="share of its tokens with ρ outside the band")
    k3_share: float | None = Field(
        description="its share of Σ_t (ρ_t − 1 − Δ_t) over the batch (the k3 KL's numerator)"
    )


class CorrectionEffect(Result):
    """What one correction does to one token."""

    correction: str = Field(description="kind and thresholds, e.g. token_tis(≤2)")
    weight: float | None = Field(description="w_t, the weight on the token's policy gradient")
    action: str = Field(description="kept (w = ρ or 1), truncated (w ≠ ρ, > 0) or masked (w = 0)")


class WorstToken(Result):
    """A token with one of the largest |Δ|."""

    sequence: int
    position: int = Field(description="index among the sequence's valid (completion) tokens")
    old_prob: float = Field(description="π_old(y_t)")
    rollout_prob: float = Field(description="μ(y_t)")
    log_diff: float = Field(description="Δ_t = ℓ_old − ℓ_μ")
    rho: float | None = Field(description="ρ_t = e^{Δ_t}")
    token: str | None = Field(None, description="the decoded token, when a tokenizer is known")
    context: str | None = Field(None, description="the token «in» its context")
    corrections: list[CorrectionEffect] = Field(default_factory=list)


class MismatchHistogram(Result):
    """Token counts over (log10 π_old(y_t), log ρ_t): the figure's 2-D histogram."""

    x_edges: list[float] = Field(description="log10 π_old edges (the outer bins take the rest)")
    y_edges: list[float] = Field(description="log ρ edges")
    counts: list[list[int]] = Field(description="counts[i][j]: log ρ bin i, log10 π_old bin j")


class ThresholdLine(Result):
    """A token-level correction's bound as a value of log ρ (a line on the figure)."""

    correction: str
    log_rho: float


class MismatchReport(Result):
    """The ``mismatch`` section: the gap localised (docs/mismatch.md)."""

    statistics: GapStatistics
    by_probability: list[MismatchBucket] = Field(description="by π_old(y_t), in decades")
    by_position: list[MismatchBucket] = Field(
        description="by relative position in the completion, in quarters"
    )
    worst: list[WorstToken] = Field(description="top-k tokens by |Δ| (diagnostics.top_k)")
    corrections: list[str] = Field(
        description="the corrections applied to each worst token: the run's own, then the "
        "frameworks' defaults of those it does not configure"
    )
    thresholds: list[ThresholdLine] = Field(
        default_factory=list,
        description="the token-level corrections' bounds and the band, in log ρ",
    )
    histogram: MismatchHistogram | None = Field(None, description="for the figure")
