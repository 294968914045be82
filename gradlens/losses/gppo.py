"""CE-GPPO and GPPO: the clipped tokens keep a bounded gradient (Kwai Klear).

PPO-clip gives a token outside the trust region no gradient at all. Gradient-preserving clipping
keeps the clipped value but lets the gradient through a ratio that is 1 in value:
β·(1 ± ε)·r/sg[r] has the value β·(1 ± ε) and the derivative β·(1 ± ε) with respect to ℓ.

``ce_gppo`` — CE-GPPO (arXiv 2509.20712), ``compute_gppo_loss_general_beta`` in
Kwai-Klear/CE-GPPO (10558fe), with r = π_θ(y)/π_old(y):
    A < 0 and r < 1 − eps_low    loss −β₁(1 − eps_low)·A·r/sg[r]    g = −A·β₁(1 − eps_low)
    A > 0 and r > 1 + eps_high   loss −β₂(1 + eps_high)·A·r/sg[r]   g = −A·β₂(1 + eps_high)
    otherwise                    loss −A·r                           g = −A·r
    dual clip c (``loss.dual_clip``), A < 0: min(that, −c·A): g = 0 where −c·A is smaller
β₁ = ``loss.gppo_beta1`` (0.25, the code's default), β₂ = ``loss.gppo_beta2`` (1.0); the paper's
recipes also use β₁ = 0.5 and 0.75.
``gppo`` — GPPO, Klear-Reasoner (arXiv 2508.07629): β₁ = β₂ = 1, so a clipped token's gradient is
the clip boundary's, (1 ± ε)·|A|, instead of 0.
Zero when: A = 0, or the dual clip fires (A < 0 and the clipped loss exceeds −c·A). A token the
trust region clips keeps a gradient (the difference from ``ppo_clip``); ``clipping.region`` still
counts it, as the reference's ``pg_clipfrac`` does.

Trap: the reference always applies the dual clip with verl's ``clip_ratio_c`` (3.0); gradlens's
``loss.dual_clip`` defaults to none, as for ``ppo_clip``: set it to 3 to reproduce the reference.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def gradient_preserving_clip(
    inputs: TokenInputs, params: LossParams, beta1: float, beta2: float
) -> LossTerms:
    """The CE-GPPO surrogate with (β₁, β₂); g as in the module docstring."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    r = ratio(inputs)
    rd = r.detach()
    low_w, high_w = beta1 * (1.0 - params.eps_low), beta2 * (1.0 + params.eps_high)
    regions = {
        "clip_upper": (adv > 0) & (rd > 1.0 + params.eps_high) & m,
        "clip_lower": (adv < 0) & (rd < 1.0 - params.eps_low) & m,
    }
    unit = r / rd  # value 1, derivative 1 with respect to ℓ
    per_token = torch.where(
        regions["clip_lower"],
        -low_w * adv * unit,
        torch.where(regions["clip_upper"], -high_w * adv * unit, -adv * r),
    )
    g = torch.where(
        regions["clip_lower"],
        -low_w * adv,
        torch.where(regions["clip_upper"], -high_w * adv, -adv * rd),
    )
    if params.dual_clip is not None:
        # min(·, −c·A) for A < 0 as a where on the strict region: a tie keeps the gradient
        regions["clip_dual"] = (adv < 0) & (per_token.detach() > -params.dual_clip * adv) & m
        per_token = torch.where(regions["clip_dual"], -params.dual_clip * adv, per_token)
        g = torch.where(regions["clip_dual"], 0.0, g)
    return LossTerms(per_token=per_token, per_token_grad=torch.where(m, g, 0.0), regions=regions)


def ce_gppo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """CE-GPPO with β₁ = loss.gppo_beta1, β₂ = loss.gppo_beta2."""
    return gradient_preserving_clip(inputs, params, params.gppo_beta1, params.gppo_beta2)


def gppo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """GPPO: β₁ = β₂ = 1."""
    return gradient_preserving_clip(inputs, params, 1.0, 1.0)


_WORDS = (
    ("clip_upper", "A > 0 and r > 1+ε_high (a bounded gradient is kept)"),
    ("clip_lower", "A < 0 and r < 1−ε_low (a bounded gradient is kept)"),
)

register(
    LossSpec(
        name="ce_gppo",
        fn=ce_gppo,
        formula="−A·r inside the trust region; clipped: −β(1±ε)·A·r/sg[r] (β₁ for A<0, β₂ "
        "for A>0) [dual clip: min(·, −c·A) for A<0]",
        grad_formula="−A·r; −A·β₁(1−eps_low) (A<0 ∧ r<1−eps_low); −A·β₂(1+eps_high) "
        "(A>0 ∧ r>1+eps_high)",
        zero_when="A = 0; the dual clip fires (A<0 ∧ −A·(clipped) > −c·A)",
        paper="CE-GPPO arXiv 2509.20712; Kwai-Klear/CE-GPPO compute_gppo_loss_general_beta",
        regions=("clip_upper", "clip_lower", "clip_dual"),
        post_formula="|g|·(1 − π_y), g = −A·r or −A·β(1 ± ε)",
        rule_words=_WORDS,
    )
)
register(
    LossSpec(
        name="gppo",
        fn=gppo,
        formula="−A·r inside the trust region; clipped: −(1±ε)·A·r/sg[r] [dual clip as ppo_clip]",
        grad_formula="−A·r; −A·(1−eps_low) (A<0 ∧ r<1−eps_low); −A·(1+eps_high) "
        "(A>0 ∧ r>1+eps_high)",
        zero_when="A = 0; the dual clip fires (A<0 ∧ r>c)",
        paper="GPPO, Klear-Reasoner arXiv 2508.07629 (CE-GPPO with β₁ = β₂ = 1)",
        regions=("clip_upper", "clip_lower", "clip_dual"),
        post_formula="|g|·(1 − π_y), g = −A·r or −A·(1 ± ε)",
        rule_words=_WORDS,
    )
)
