"""The statistics each framework logs for the training–inference gap, under their names.

Over the valid tokens t of the valid sequences i (those with at least one valid token), with
ℓ_old = log π_old(y_t), ℓ_μ = log μ(y_t), Δ_t = ℓ_old − ℓ_μ and ρ_t = e^{Δ_t}, and the
per-sequence means m̄_i(x) = (1/L_i) Σ_{t∈i} x_t:

    kl                mean(−Δ)                    k1 of KL(μ‖π_old)  verl rollout_corr/kl
    k2_kl             mean(½Δ²)                   k2
    k3_kl             mean(ρ − 1 − Δ)             k3        verl k3_kl, NeMo gen_kl_error
    reverse_k3_kl     mean(1/ρ − 1 + Δ)           k3 with the roles swapped: NeMo policy_kl_error
    js_divergence     mean(½k3(π_old/m) + ½k3(μ/m)), m = ½(π_old + μ): NeMo js_divergence_error
    mult_prob_error   mean e^{|Δ|}                NeMo token_mult_prob_error
    training_log_ppl  mean_i(−m̄_i(ℓ_old))        training_ppl = mean_i e^{−m̄_i(ℓ_old)}
    rollout_log_ppl   mean_i(−m̄_i(ℓ_μ))          rollout_ppl  = mean_i e^{−m̄_i(ℓ_μ)}
    log_ppl_diff      mean_i d_i, d_i = m̄_i(ℓ_μ − ℓ_old)   (+ mean |d_i|, max, min)
    ppl_ratio         mean_i e^{d_i}
    chi2_token        mean(e^{2·clamp(Δ, ±20)}) − 1                   verl chi2_token
    chi2_seq          mean_i e^{2·clamp(Σ_{t∈i}Δ_t, ±20)} − 1         verl chi2_seq
    ess               1/mean((w/w̄)²), w = min(ρ, cap), w̄ = mean w
                      verl rollout_is_eff_sample_size
    ess_raw           (mean ρ)²/mean ρ²           the same of the raw ρ (no cap)
    pearson_logp      corr(ℓ_old, ℓ_μ)
    pearson_prob      corr(π_old, μ)              verl training/rollout_actor_probs_pearson_corr
    prob_diff_*       mean, max and unbiased std of |π_old − μ|
                      verl training/rollout_probs_diff_*
    outside_band      share with ρ ∉ [low, high]  TRL issue 6789 counts [0.9, 1.1]

Sources. verl 0.9.1: ``verl/trainer/ppo/rollout_corr_helper.py`` ``compute_offpolicy_metrics``
(kl … chi2_seq; ±20 is its ``SAFETY_BOUND``) and ``compute_is_metrics`` (the ESS, whose weights
are the applied IS weights clamped to [0, rollout_is_threshold]: with token TIS at cap C they are
min(ρ, C)), and ``verl/utils/debug/metrics.py`` ``calculate_debug_metrics`` (Pearson and
probability differences, on probabilities, not log-probs). NeMo RL 7ea279a:
``nemo_rl/algorithms/loss/loss_functions.py`` ``ClippedPGLossFn`` with its default
``reference_policy_kl_type: k3`` — ``calculate_kl(logprobs, logprobs_reference)`` is
e^{r} − 1 − r with r = logprobs_reference − logprobs; gen_kl_error passes (ℓ_μ, ℓ_old), so r = Δ,
policy_kl_error (ℓ_old, ℓ_μ), so r = −Δ — and ``docs/guides/grpo.md`` "Metrics"; NeMo RL is not
installed here, so its four names are tested against hand-computed cases. Every mean is over
the valid tokens (or valid sequences); where verl divides by ``count + 1e-8``, gradlens divides
by ``count``, and where verl averages over every row of the batch (an empty row counts with
perplexity 1 and ρ_seq = 1), gradlens averages over the valid sequences. The arithmetic is in
float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num
from gradlens.results import GapStatistics

SAFETY_BOUND = 20.0  # verl clamps log ρ (and Σ log ρ) to ±20 before χ²
BAND = (0.9, 1.1)  # TRL issue 6789's band of ρ


def _pearson(x: Tensor, y: Tensor) -> float | None:
    """corr(x, y) of two 1-D float64 tensors; None when either is constant or has < 2 entries."""
    if x.numel() < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return None if float(denominator) == 0.0 else num((dx * dy).sum() / denominator)


def _k3(log_ratio: Tensor) -> Tensor:
    return log_ratio.exp() - 1 - log_ratio


def empty_statistics(band: tuple[float, float] = BAND) -> GapStatistics:
    """The statistics of a batch without a valid token: counts 0, every number null."""
    names = GapStatistics.model_fields.keys() - {"count", "sequences", "band_low", "band_high"}
    return GapStatistics(
        count=0,
        sequences=0,
        band_low=band[0],
        band_high=band[1],
        **dict.fromkeys(names),
    )


def gap_statistics(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    is_cap: float = 2.0,
    band: tuple[float, float] = BAND,
) -> GapStatistics:
    """The module docstring's statistics of [N, T] ``old_logp`` and ``rollout_logp`` over
    ``mask``; a token whose Δ is not finite is left out; ``is_cap`` is the ESS weights' cap."""
    old, roll = old_logp.double(), rollout_logp.double()
    valid = mask & torch.isfinite(old - roll)
    rows = valid.any(-1)
    valid, old, roll = valid[rows], old[rows], roll[rows]
    if not bool(valid.any()):
        return empty_statistics(band)
    m = valid.double()
    old, roll = torch.where(valid, old, 0.0), torch.where(valid, roll, 0.0)
    delta = old - roll  # [S, T], 0 off the valid tokens
    lengths = m.sum(-1)  # [S] ≥ 1
    d, lo, lr = delta[valid], old[valid], roll[valid]  # [M]
    rho = d.exp()

    seq_old = old.sum(-1) / lengths  # m̄_i(ℓ_old)
    seq_roll = roll.sum(-1) / lengths
    diff = seq_roll - seq_old  # d_i = m̄_i(ℓ_μ − ℓ_old)
    sum_delta = delta.sum(-1)  # Σ_{t∈i} Δ_t

    log_mix = torch.logaddexp(lo, lr) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    weights = rho.clamp(min=0.0, max=is_cap)
    po, pr = lo.exp(), lr.exp()
    prob_diff = (po - pr).abs()
    return GapStatistics(
        count=int(d.numel()),
        sequences=int(lengths.numel()),
        kl=num((-d).mean()),
        k2_kl=num((0.5 * d.square()).mean()),
        k3_kl=num(_k3(d).mean()),
        reverse_k3_kl=num(_k3(-d).mean()),
        js_divergence=num((0.5 * _k3(lo - log_mix) + 0.5 * _k3(lr - log_mix)).mean()),
        mult_prob_error=num(d.abs().exp().mean()),
        training_ppl=num((-seq_old).exp().mean()),
        rollout_ppl=num((-seq_roll).exp().mean()),
        training_log_ppl=num((-seq_old).mean()),
        rollout_log_ppl=num((-seq_roll).mean()),
        log_ppl_diff=num(diff.mean()),
        log_ppl_abs_diff=num(diff.abs().mean()),
        log_ppl_diff_max=num(diff.max()),
        log_ppl_diff_min=num(diff.min()),
        ppl_ratio=num(diff.exp().mean()),
        chi2_token=num((2 * d.clamp(-SAFETY_BOUND, SAFETY_BOUND)).exp().mean() - 1),
        chi2_seq=num((2 * sum_delta.clamp(-SAFETY_BOUND, SAFETY_BOUND)).exp().mean() - 1),
        ess=num(1.0 / (weights / weights.mean()).square().mean()),
        ess_cap=is_cap,
        ess_raw=num(rho.mean().square() / rho.square().mean()),
        pearson_logp=_pearson(lo, lr),
        pearson_prob=_pearson(po, pr),
        prob_diff_mean=num(prob_diff.mean()),
        prob_diff_max=num(prob_diff.max()),
        prob_diff_std=num(prob_diff.std()) if prob_diff.numel() > 1 else None,
        band_low=band[0],
        band_high=band[1],
        outside_band=num(((rho < band[0]) | (rho > band[1])).double().mean()),
    )
