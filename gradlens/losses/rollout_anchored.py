"""Losses whose importance weight is anchored on the rollout policy μ instead of π_old: SkyRL's
``rollout_is`` and CISPO with ``cispo_anchor="rollout"`` (``skyrl/backends/skyrl_train/utils/
ppo_utils.py``, a956457).

In fully asynchronous training the sampler lags the trainer, and a recomputed π_old may not
exist: the weight is then taken against what actually sampled the tokens, r_μ = π_θ(y)/μ(y) =
exp(ℓ − ℓ_rollout). On a single gradient pass r = π_θ/π_old is 1 and a π_old-anchored weight never
binds; r_μ is not 1 (the training–inference gap plus staleness).

``rollout_is`` — IcePop-like hard band on r_μ (IcePop masks ρ = π_old/μ instead):
    per-token loss  −A·sg[r_μ·1[1 − eps_low < r_μ < 1 + eps_high]]·log π_θ(y)
    g = −A·r_μ inside the band, 0 outside             region is_masked (SkyRL clip_ratio)
    The band is open (strict), as SkyRL's: exactly at a bound the token is masked. SkyRL uses its
    PPO widths ``eps_clip_low/high`` (0.2/0.2); gradlens uses ``loss.eps_low``/``eps_high``.
``cispo_rollout`` — CISPO (``cispo``, losses.md §2.8; MiniMax-M1, arXiv 2506.13585) with r_μ in
place of r:
    per-token loss  −A·sg[clip(r_μ, 1 − cispo_eps_low, 1 + cispo_eps_high)]·log π_θ(y)
    g = −A·clip(r_μ, ...)                             region weight_clipped (SkyRL clip_ratio)
    SkyRL's defaults are ``cispo_eps_clip_low = 1`` and ``_high = 4`` (bounds [0, 5], ScaleRL);
    gradlens's ``loss.cispo_eps_low/high`` default to 10 and 0.28 (verl's CISPO).
Zero when: A = 0 (rollout_is: also r_μ outside the band).

Both need the batch's rollout log-probs; without them μ := π_old (r_μ = r) and ``compare`` says
so. SkyRL rejects stacking TIS on ``cispo_anchor="rollout"``: r_μ already contains ρ, so a
``loss.corrections`` weight counts it twice (``compare`` says so when both are set). SkyRL
clamps log r_μ to ±20; gradlens does not. SkyRL also logs ``cispo/ratio_{mean,clamped_mean,max,
min}`` because the cap-hit share alone says little: gradlens reports ``metrics.ratio_mu`` (the
mean r_μ, aggregated like the loss) and ``metrics.ratio_mu_used`` (the mean weight applied).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def rollout_ratio(inputs: TokenInputs) -> Tensor:
    """[N, T] r_μ = π_θ(y)/μ(y), detached (μ := π_old without rollout log-probs)."""
    mu = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    return torch.exp(inputs.logp.detach() - mu)


def _weighted(inputs: TokenInputs, weight: Tensor, r_mu: Tensor, region: dict) -> LossTerms:
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    g = torch.where(m & (weight != 0), -adv * weight, 0.0)  # a masked token: 0, not −0
    return LossTerms(
        per_token=g * inputs.logp,
        per_token_grad=g,
        regions=region,
        token_metrics={
            "ratio_mu": torch.where(m, r_mu, 0.0),
            "ratio_mu_used": torch.where(m, weight, 0.0),
        },
    )


def rollout_is(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·sg[r_μ·1[in the open band]]·ℓ, g = −A·r_μ inside the band."""
    r_mu = rollout_ratio(inputs)
    inside = (r_mu > 1.0 - params.eps_low) & (r_mu < 1.0 + params.eps_high)
    weight = torch.where(inside, r_mu, 0.0)
    return _weighted(inputs, weight, r_mu, {"is_masked": ~inside & inputs.mask})


def cispo_rollout(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·sg[clip(r_μ, 1 − low, 1 + high)]·ℓ, g = −A·clip(r_μ)."""
    r_mu = rollout_ratio(inputs)
    low, high = 1.0 - params.cispo_eps_low, 1.0 + params.cispo_eps_high
    weight = torch.clamp(r_mu, low, high)
    clipped = ((r_mu < low) | (r_mu > high)) & inputs.mask
    return _weighted(inputs, weight, r_mu, {"weight_clipped": clipped})


_NOTE = (
    "r_μ = π_θ/μ already contains ρ = π_old/μ, so a correction counts the training–inference "
    "ratio twice (SkyRL rejects TIS with cispo_anchor='rollout')"
)

register(
    LossSpec(
        name="rollout_is",
        fn=rollout_is,
        formula="−A·sg[r_μ·1[1−eps_low < r_μ < 1+eps_high]]·log π_θ(y), r_μ = π_θ(y)/μ(y)",
        grad_formula="−A·r_μ inside the open band, 0 outside",
        zero_when="A = 0; r_μ ≤ 1−eps_low or r_μ ≥ 1+eps_high",
        paper="SkyRL rollout_is (policy_loss_type, a956457); IcePop-like band on π_θ/μ",
        regions=("is_masked",),
        post_formula="1[band]·r_μ·|A|·(1 − π_y)",
        needs=("rollout_logp",),
        correction_note=_NOTE,
    )
)
register(
    LossSpec(
        name="cispo_rollout",
        fn=cispo_rollout,
        formula="−A·sg[clip(r_μ, 1−cispo_eps_low, 1+cispo_eps_high)]·log π_θ(y), r_μ = π_θ/μ",
        grad_formula="−A·clip(r_μ, 1−cispo_eps_low, 1+cispo_eps_high)",
        zero_when="A = 0 (clipping rescales, never zeroes)",
        paper="CISPO arXiv 2506.13585 anchored on the rollout: SkyRL cispo_anchor='rollout'",
        regions=("weight_clipped",),
        post_formula="clip(r_μ)·|A|·(1 − π_y)",
        needs=("rollout_logp",),
        correction_note=_NOTE,
    )
)
