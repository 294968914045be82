"""What verl, TRL, OpenRLHF and slime call the quantities gradlens reports (losses.md §11.2).

A static table, copied into every JSON report as ``metric_names`` so that a report can be lined
up against a training log. ``key`` is the JSON path in the report (``losses[]`` = every entry
of ``losses``). None: the framework logs no such quantity. ``note`` records where frameworks
that seem to agree do not: the traps A3, A4, A5, A7 and A11 of losses.md §13.

Framework versions the names and notes were read from: verl 0.9.1, TRL 1.16.0, OpenRLHF
0.11.2 (each checked by running its own loss code, tests/losses/test_frameworks.py), slime
624b824 (read only). docs/losses.md §9 has the tables of definitions per version.
"""

from __future__ import annotations

from gradlens.results import MetricName


def _row(
    key: str,
    quantity: str,
    verl: str | None,
    trl: str | None,
    openrlhf: str | None,
    slime: str | None,
    note: str | None = None,
) -> MetricName:
    return MetricName(
        key=key, quantity=quantity, verl=verl, trl=trl, openrlhf=openrlhf, slime=slime, note=note
    )


METRIC_NAMES: tuple[MetricName, ...] = (
    _row(
        "losses[].loss",
        "the aggregated loss L",
        "actor/pg_loss",
        "policy_loss",
        "policy_loss",
        "pg_loss",
        "gradlens's L includes grpo's β·KL and the entropy bonus; the frameworks' policy loss "
        "excludes both (TRL logs policy_loss only when the entropy bonus is on)",
    ),
    _row(
        "losses[].clipping.region",
        "share of tokens the PPO trust region switched off (M_t = 0)",
        "actor/pg_clipfrac",
        "clip_ratio/region_mean",
        "ppo_clip_ratio",
        "pg_clipfrac",
        "slime averages per sample first; for gspo verl counts every token of a clipped "
        "sequence (token-weighted) while TRL counts sequences (A7): see "
        "clipping.sequence_shares.seq_clipped; verl 0.7–0.8 forced GSPO's aggregation to "
        "seq-mean-token-mean, 0.9 honours loss_agg_mode; verl 0.7–0.9 force SAPO's",
    ),
    _row(
        "losses[].clipping.upper",
        "share with A > 0 and r > 1 + eps_high",
        None,
        "clip_ratio/high_mean",
        None,
        None,
    ),
    _row(
        "losses[].clipping.lower",
        "share with A < 0 and r < 1 − eps_low",
        None,
        "clip_ratio/low_mean",
        None,
        None,
        "not verl's actor/pg_clipfrac_lower, which is the dual-clip region (A4)",
    ),
    _row(
        "losses[].clipping.dual",
        "share with A < 0 and r > c (dual clip)",
        "actor/pg_clipfrac_lower",
        None,
        None,
        None,
        "verl's 'lower' is dual clip, always on in verl vanilla; TRL's low_mean is the lower "
        "trust region, clipping.lower (A4)",
    ),
    _row(
        "losses[].clipping.sequence_shares.seq_clipped",
        "gspo: share of sequences clipped",
        None,
        "clip_ratio/region_mean (importance_sampling_level=sequence)",
        None,
        None,
        "sequence-weighted; verl's actor/pg_clipfrac for gspo is the token-weighted "
        "clipping.region (A7)",
    ),
    _row(
        "losses[].clipping.shares.weight_clipped",
        "cispo: share with r ≠ clip(r, 1 − eps_low, 1 + eps_high), any sign of A",
        "actor/pg_clipfrac",
        None,
        None,
        "pg_clipfrac",
        "CISPO's clip rescales the gradient, it never switches a token off; TRL's cispo is "
        "an absolute cap, a different parametrisation (A5)",
    ),
    _row(
        "losses[].clipping.shares.weight_capped_pos",
        "cispo_cap: share with A > 0 and r > cispo_cap",
        None,
        "cispo_clip_ratio",
        None,
        None,
        "TRL's epsilon_high is an absolute cap here, not a relative width (A5)",
    ),
    _row(
        "losses[].clipping.seq_masked_sequences",
        "OPSM: share of sequences masked",
        None,
        None,
        None,
        "opsm_clipfrac",
        "slime's opsm_clipfrac is a count of masked sequences in the micro-batch, not a "
        "share; slime uses training-engine log-probs unless --use-rollout-logprobs (A3)",
    ),
    _row(
        "ratio.kl_k1",
        "mean(ℓ_old − ℓ): k1 estimate of KL(π_old‖π_θ)",
        "actor/ppo_kl",
        None,
        "ppo_kl",
        "ppo_kl",
    ),
    _row(
        "losses[].metrics.kl",
        "grpo: the KL estimate D to π_ref, aggregated like the loss, before β",
        "actor/kl_loss",
        "kl",
        "kl",
        "kl_loss",
        "default estimators differ (A11): verl 0.9 low_var_kl (k3, clamped to ±10); TRL 1.16 "
        "k3 times the ratio r, not detached (use_bias_correction_kl=True, the default from "
        "1.10), whose gradient is gradlens's unbiased, plain k3 with False; OpenRLHF 0.11 k1, "
        "computed in float32 and clamped to ±10; slime k1; gradlens clamps none. The KL term "
        "is aggregated with the policy's loss_agg_mode in verl, with the loss_type in TRL, "
        "always as a token mean in OpenRLHF; TRL's logged kl is a token mean; β is verl's "
        "actor/kl_coef",
    ),
    _row(
        "batch.mean_entropy",
        "mean entropy H(π_θ) over valid tokens",
        "actor/entropy",
        "entropy",
        "entropy_loss",
        "entropy_loss",
        "gradlens averages over tokens; verl and OpenRLHF aggregate with the loss's "
        "aggregation mode",
    ),
    _row(
        "losses[].rows.total_norm",
        "‖∂L/∂W‖_F of the lm_head",
        "actor/grad_norm",
        "grad_norm",
        "actor_grad_norm",
        None,
        "the frameworks log the norm over all parameters (before clipping); gradlens's is the "
        "lm_head's alone",
    ),
    _row(
        "rollout.kl_k1",
        "mean(ℓ_rollout − ℓ_old): the training–inference gap",
        "rollout_corr/kl",
        None,
        "vllm_kl",
        None,
    ),
    _row("rollout.kl_k3", "mean(ρ − 1 − log ρ)", "rollout_corr/k3_kl", None, None, None),
    _row(
        "rollout.rho_mean",
        "mean ρ = π_old/μ_old",
        "rollout_corr/rollout_is_mean",
        "sampling/importance_sampling_ratio/mean",
        None,
        "tis",
        "gradlens reports the raw ρ; verl's and TRL's statistics describe the weights they "
        "apply, slime's tis is the raw ρ",
    ),
    _row(
        "rollout.abs_diff_mean",
        "mean |ℓ_old − ℓ_rollout|",
        None,
        "sampling/sampling_logp_difference/mean",
        None,
        "train_rollout_logprob_abs_diff",
    ),
    _row(
        "rollout.abs_diff_max",
        "max |ℓ_old − ℓ_rollout|",
        None,
        "sampling/sampling_logp_difference/max",
        None,
        None,
    ),
    *(
        _row(f"mismatch.statistics.{key}", quantity, verl, None, None, None, note)
        for key, quantity, verl, note in (
            ("kl", "mean(ℓ_μ − ℓ_old), k1", "rollout_corr/kl", None),
            (
                "k3_kl",
                "mean(ρ − 1 − log ρ), k3",
                "rollout_corr/k3_kl",
                "NeMo RL gen_kl_error (its default kl_type k3)",
            ),
            ("k2_kl", "mean(½ log² ρ), k2", None, None),
            (
                "reverse_k3_kl",
                "mean(1/ρ − 1 + log ρ)",
                None,
                "NeMo RL policy_kl_error (its default kl_type k3)",
            ),
            ("js_divergence", "Jensen–Shannon term per token", None, "NeMo RL js_divergence_error"),
            ("mult_prob_error", "mean e^|log ρ|", None, "NeMo RL token_mult_prob_error"),
            ("training_ppl", "mean_i exp(−mean_t ℓ_old)", "rollout_corr/training_ppl", None),
            ("rollout_ppl", "mean_i exp(−mean_t ℓ_μ)", "rollout_corr/rollout_ppl", None),
            ("log_ppl_diff", "mean_i mean_t(ℓ_μ − ℓ_old)", "rollout_corr/log_ppl_diff", None),
            ("ppl_ratio", "mean_i exp(mean_t(ℓ_μ − ℓ_old))", "rollout_corr/ppl_ratio", None),
            ("chi2_token", "mean ρ² − 1", "rollout_corr/chi2_token", None),
            ("chi2_seq", "mean_i (Π_t ρ_t)² − 1", "rollout_corr/chi2_seq", None),
            (
                "ess",
                "1/mean((w/w̄)²), w = min(ρ, cap)",
                "rollout_corr/rollout_is_eff_sample_size",
                "verl's weights are the applied IS weights; token TIS at cap gives min(ρ, cap)",
            ),
            (
                "pearson_prob",
                "corr(π_old, μ)",
                "training/rollout_actor_probs_pearson_corr",
                "on probabilities; pearson_logp is the same on log-probs",
            ),
            ("prob_diff_mean", "mean |π_old − μ|", "training/rollout_probs_diff_mean", None),
            ("prob_diff_max", "max |π_old − μ|", "training/rollout_probs_diff_max", None),
        )
    ),
    _row(
        "losses[].clipping.shares.tis_truncated",
        "token_tis: share of tokens whose ρ was truncated",
        "rollout_corr/rollout_is_ratio_fraction_high (+ _low)",
        None,
        None,
        "tis_clipfrac",
    ),
    _row(
        "losses[].clipping.shares.seq_geo_masked",
        "geo_mask: share of tokens in rejected sequences",
        "rollout_corr/rollout_rs_masked_fraction",
        None,
        None,
        None,
        "verl thresholds −log ρ: its 'lo_hi' equals gradlens's [lo, hi] only when lo = 1/hi "
        "(A8); sequence share under clipping.sequence_shares",
    ),
)


def metric_names() -> list[MetricName]:
    """The crosswalk, in report order."""
    return list(METRIC_NAMES)
