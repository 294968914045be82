"""DPPO: a trust region on the probability itself, not on the ratio (Qi et al., "Rethinking the
Trust Region in LLM Reinforcement Learning", arXiv 2602.04879, eqs. 13–14), and prime-rl's two
losses built on it.

PPO's ratio clip over-penalises low-probability tokens (a small absolute move is a large ratio)
and under-penalises high-probability ones. DPPO masks a token by a divergence between the two
Bernoulli distributions "y / not y" under π_old and π_θ instead, one-sided by the sign of A as
PPO's clip is. With π = π_θ(y), π_o = π_old(y), r = π/π_o:

``dppo_tv`` — verl ``dppo_tv``, the binary total variation |π − π_o|:
    M = 0 iff (A > 0 and π − π_o > δ_hi) or (A < 0 and π − π_o < −δ_lo)
``dppo_kl`` — verl ``dppo_kl``, the binary KL D = π_o·log(π_o/π) + (1 − π_o)·log((1 − π_o)/(1 − π)):
    M = 0 iff (A > 0 and π > π_o and D > δ_hi) or (A < 0 and π < π_o and D > δ_lo)
both:
    per-token loss  −A·sg[min(r, C)]·M·log π_θ(y)        g = −A·min(r, C)·M
The weight is truncated importance sampling with the cap C = ``loss.dppo_cap`` (None: no cap) and
is detached, so unlike PPO the gradient never flows through r.
Zero when: A = 0 or M = 0.

Trap (verl's C). verl reads ``config.get("clip_ratio_c", 20.0)``: the code's fallback is 20, but
``actor.yaml`` always sets ``clip_ratio_c: 3.0`` (dual-clip PPO's constant), so a verl run truncates
at 3 unless it overrides it; the DPPO example script sets 10000 (no truncation in practice), with
δ = 0.15 (TV) or 0.05 (KL) for both sides and ``seq-mean-token-sum-norm``. gradlens's defaults
are C = 3 (what verl does by default) and those δ. verl's ``pg_clipfrac_lower`` for DPPO is the
share with r > C among the kept tokens, not the dual-clip share (region ``ratio_capped`` here).
verl counts a token with A = 0 as masked when it fails the A < 0 test; gradlens never counts A = 0
as clipped (its gradient is 0 either way). verl adds 1e-8 inside the binary KL's logarithm and
clamps log r to ±20; gradlens computes both exactly.

``prime_rl`` — prime-rl's default loss (``default_loss_fn``): DPPO-TV against the *inference*
policy μ plus Kimi-K2.5's squared log-ratio term (arXiv 2602.02276), with r_μ = π_θ/μ:
    per-token loss  −A·r_μ·M + τ·(ℓ − ℓ_μ)²,    M = 0 iff (A > 0 and π − μ > δ_hi)
                                                        or (A < 0 and π − μ < −δ_lo)
    g = −A·r_μ·M + 2τ·(ℓ − ℓ_μ)
The ratio is *not* detached (the gradient flows through r_μ, ∂r_μ/∂ℓ = r_μ) and not truncated:
prime-rl's docs write min(π/μ, δ), the code at 559b447 has no clamp (doc/code drift). Defaults
δ = 0.2/0.2 (``loss.prime_mask_low/high``), τ = 1e-3 (``loss.prime_kl_tau``); prime-rl's
``adv_tau`` (1) is a scale of A. It sums over tokens and divides by the global token count:
``token_mean``. SkyRL's ``dppo`` (binary_tv) is this loss with τ = 0 and its own δ.
``prime_ipo`` — prime-rl's ``ipo_loss_fn``: the same with a symmetric mask that ignores the sign
of A, M = 0 iff |π − μ| > ``loss.ipo_threshold`` (0.1).
Zero when: (A = 0 or M = 0) and ℓ = ℓ_μ.

The τ term is a penalty (`LossTerms.penalty`): like grpo's KL it is not weighted by
``loss.corrections`` or the top-entropy selection. Without rollout log-probs μ := π_old and
``compare`` says so. Both anchor on μ, so a correction (which multiplies by π_old/μ) counts the
training–inference ratio twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def binary_kl(logp: Tensor, old_logp: Tensor) -> Tensor:
    """[N, T] D = π_o·log(π_o/π) + (1 − π_o)·log((1 − π_o)/(1 − π)), detached, exact."""
    p, p_old = torch.exp(logp), torch.exp(old_logp)
    rest_old = 1.0 - p_old
    # (1 − π_o)·log((1 − π_o)/(1 − π)); 0 when π_o = 1 (verl adds 1e-8 inside the log instead)
    tail = torch.where(
        rest_old > 0, rest_old * (torch.log1p(-p_old) - torch.log1p(-p)), torch.zeros_like(p)
    )
    return p_old * (old_logp - logp) + tail


def _truncated_ratio_loss(
    inputs: TokenInputs, keep: Tensor, regions: dict[str, Tensor], cap: float | None
) -> LossTerms:
    """−A·sg[min(r, C)]·M·ℓ per token, g = −A·min(r, C)·M (M = ``keep``)."""
    adv = torch.where(inputs.mask, inputs.advantages, 0.0)
    rd = ratio(inputs).detach()
    weight = rd if cap is None else torch.clamp(rd, max=cap)
    g = torch.where(keep, -adv * weight, 0.0)
    if cap is not None:
        regions = {**regions, "ratio_capped": (rd > cap) & keep}
    return LossTerms(per_token=g * inputs.logp, per_token_grad=g, regions=regions)


def dppo_tv(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """DPPO-Binary-TV: g = −A·min(r, C)·M_TV."""
    m, adv = inputs.mask, inputs.advantages
    logp = inputs.logp.detach()
    diff = torch.exp(logp) - torch.exp(inputs.old_logp)  # π − π_o
    regions = {
        "clip_upper": (adv > 0) & (diff > params.dppo_tv_high) & m,
        "clip_lower": (adv < 0) & (diff < -params.dppo_tv_low) & m,
    }
    keep = m & ~(regions["clip_upper"] | regions["clip_lower"])
    return _truncated_ratio_loss(inputs, keep, regions, params.dppo_cap)


def dppo_kl(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """DPPO-Binary-KL: g = −A·min(r, C)·M_KL."""
    m, adv = inputs.mask, inputs.advantages
    logp = inputs.logp.detach()
    d = binary_kl(logp, inputs.old_logp)
    regions = {
        "clip_upper": (adv > 0) & (logp > inputs.old_logp) & (d > params.dppo_kl_high) & m,
        "clip_lower": (adv < 0) & (logp < inputs.old_logp) & (d > params.dppo_kl_low) & m,
    }
    keep = m & ~(regions["clip_upper"] | regions["clip_lower"])
    return _truncated_ratio_loss(inputs, keep, regions, params.dppo_cap)


def _prime_loss(
    inputs: TokenInputs, keep: Tensor, regions: dict[str, Tensor], tau: float
) -> LossTerms:
    """−A·r_μ·M + τ(ℓ − ℓ_μ)² per token, g = −A·r_μ·M + 2τ(ℓ − ℓ_μ)."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    mu = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    log_r = inputs.logp - mu  # differentiable
    r = torch.exp(log_r)
    policy = torch.where(keep, -adv * r, 0.0)
    penalty = torch.where(m, tau * log_r * log_r, 0.0)
    policy_c = torch.where(keep, -adv * r.detach(), 0.0)
    penalty_c = torch.where(m, 2.0 * tau * log_r.detach(), 0.0)
    rd, lrd = r.detach(), log_r.detach()
    return LossTerms(
        per_token=policy + penalty,
        per_token_grad=policy_c + penalty_c,
        regions=regions,
        penalty=penalty,
        penalty_grad=penalty_c,
        token_metrics={"mismatch_kl": torch.where(m, rd - lrd - 1.0, 0.0)},
    )


def _prob_diff(inputs: TokenInputs) -> Tensor:
    """[N, T] π_θ(y) − μ(y), detached (μ := π_old without rollout log-probs)."""
    mu = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    return torch.exp(inputs.logp.detach()) - torch.exp(mu)


def prime_rl(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """prime-rl default: DPPO-TV against μ, ratio π_θ/μ with gradient, + τ(ℓ − ℓ_μ)²."""
    m, adv = inputs.mask, inputs.advantages
    diff = _prob_diff(inputs)
    regions = {
        "clip_upper": (adv > 0) & (diff > params.prime_mask_high) & m,
        "clip_lower": (adv < 0) & (diff < -params.prime_mask_low) & m,
    }
    keep = m & ~(regions["clip_upper"] | regions["clip_lower"])
    return _prime_loss(inputs, keep, regions, params.prime_kl_tau)


def prime_ipo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """prime-rl IPO: symmetric mask |π_θ − μ| > threshold, whatever the sign of A."""
    masked = (_prob_diff(inputs).abs() > params.ipo_threshold) & inputs.mask
    return _prime_loss(inputs, inputs.mask & ~masked, {"tv_masked": masked}, params.prime_kl_tau)


_MU_NOTE = (
    "the loss's ratio is already π_θ/μ, so a correction's ρ = π_old/μ counts the "
    "training–inference ratio a second time (prime-rl applies none)"
)

register(
    LossSpec(
        name="dppo_tv",
        fn=dppo_tv,
        formula="−A·sg[min(r, C)]·M·log π_θ(y), M = 0 iff A>0 ∧ π−π_old > δ_hi or "
        "A<0 ∧ π−π_old < −δ_lo",
        grad_formula="−A·min(r, C)·M",
        zero_when="A = 0; A>0 ∧ π_θ(y)−π_old(y) > dppo_tv_high; A<0 ∧ π_θ(y)−π_old(y) < "
        "−dppo_tv_low",
        paper="DPPO-Binary-TV, arXiv 2602.04879 eq. 13; verl `dppo_tv` (C = clip_ratio_c: 3 "
        "from actor.yaml, not the code's fallback 20)",
        regions=("clip_upper", "clip_lower", "ratio_capped"),
        post_formula="M·min(r, C)·|A|·(1 − π_y)",
        rule_words=(
            ("clip_upper", "A > 0 and π_θ − π_old > δ_hi (binary TV)"),
            ("clip_lower", "A < 0 and π_θ − π_old < −δ_lo (binary TV)"),
        ),
    )
)
register(
    LossSpec(
        name="dppo_kl",
        fn=dppo_kl,
        formula="−A·sg[min(r, C)]·M·log π_θ(y), M from the binary KL D(π_old(y) ‖ π_θ(y))",
        grad_formula="−A·min(r, C)·M",
        zero_when="A = 0; A>0 ∧ π>π_old ∧ D > dppo_kl_high; A<0 ∧ π<π_old ∧ D > dppo_kl_low",
        paper="DPPO-Binary-KL, arXiv 2602.04879 eq. 14; verl `dppo_kl`",
        regions=("clip_upper", "clip_lower", "ratio_capped"),
        post_formula="M·min(r, C)·|A|·(1 − π_y)",
        rule_words=(
            ("clip_upper", "A > 0, π_θ > π_old and binary KL > δ_hi"),
            ("clip_lower", "A < 0, π_θ < π_old and binary KL > δ_lo"),
        ),
    )
)
register(
    LossSpec(
        name="prime_rl",
        fn=prime_rl,
        formula="−A·r_μ·M + τ·(ℓ − ℓ_μ)², r_μ = π_θ/μ (with gradient), M: DPPO-TV against μ",
        grad_formula="−A·r_μ·M + 2τ(ℓ − ℓ_μ)",
        zero_when="(A = 0 or M = 0) and ℓ = ℓ_μ",
        paper="prime-rl default_loss_fn (559b447): DPPO-TV arXiv 2602.04879 + Kimi-K2.5 KL "
        "arXiv 2602.02276",
        regions=("clip_upper", "clip_lower"),
        post_formula="|g|·(1 − π_y), g = −A·r_μ·M + 2τ(ℓ − ℓ_μ)",
        needs=("rollout_logp",),
        correction_note=_MU_NOTE,
        rule_words=(
            ("clip_upper", "A > 0 and π_θ − μ > δ_hi (binary TV against μ)"),
            ("clip_lower", "A < 0 and π_θ − μ < −δ_lo (binary TV against μ)"),
        ),
    )
)
register(
    LossSpec(
        name="prime_ipo",
        fn=prime_ipo,
        formula="−A·r_μ·M + τ·(ℓ − ℓ_μ)², M = 0 iff |π_θ(y) − μ(y)| > ipo_threshold",
        grad_formula="−A·r_μ·M + 2τ(ℓ − ℓ_μ)",
        zero_when="(A = 0 or |π_θ(y) − μ(y)| > ipo_threshold) and ℓ = ℓ_μ",
        paper="prime-rl ipo_loss_fn (559b447)",
        regions=("tv_masked",),
        post_formula="|g|·(1 − π_y), g = −A·r_μ·M + 2τ(ℓ − ℓ_μ)",
        needs=("rollout_logp",),
        correction_note=_MU_NOTE,
    )
)
