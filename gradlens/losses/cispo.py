"""CISPO: clip the importance weight, not the surrogate (MiniMax-M1, arXiv 2506.13585, eqs. 4–5).

The frameworks ship two parametrisations of the clip (trap A5), registered under two names so
that neither can be mistaken for the other:

``cispo`` — the paper's, as verl and slime implement it, with relative bounds:
    per-token loss  −A·sg[r̂]·log π_θ(y),   r̂ = clip(r, 1 − cispo_eps_low, 1 + cispo_eps_high)
    g_t = −A·r̂.  The paper sets ε_low large (no lower bound) and tunes ε_high; gradlens's
    defaults are cispo_eps_low = 10 (verl's example; 1 − 10 < 0 disables the bound) and
    cispo_eps_high = 0.28.
``cispo_cap`` — TRL's ``loss_type="cispo"``, an absolute cap with no lower bound:
    per-token loss  −A·sg[min(r, ε_max)]·log π_θ(y),   g_t = −A·min(r, ε_max)
    ε_max = ``loss.cispo_cap`` (TRL's ``epsilon_high``, recommended 5.0 after ScaleRL). With
    ε_max = 1 + ε_high and no lower bound the two agree; with TRL's ε_high = 0.28 read as a
    relative width they do not: 0.28 is a cap of r at 0.28.

Zero when: A = 0. Clipping never switches a token off; it only rescales its gradient (the
difference from PPO-clip, whose M_t = 0 there). At r = 2 with ε_high = 0.28: CISPO weight 1.28,
PPO-clip gradient 0 (TC6).

Clip fractions, as each framework counts them:
    ``weight_clipped``      r ≠ clip(r), either side, any sign of A   verl/slime pg_clipfrac
    ``weight_capped``       r > ε_max, any sign of A
    ``weight_capped_pos``   A > 0 and r > ε_max                        TRL cispo_clip_ratio
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def cispo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·sg[clip(r, 1 − ε_low, 1 + ε_high)]·ℓ per token, g_t = −A·r̂."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    rd = ratio(inputs).detach()
    low, high = 1.0 - params.cispo_eps_low, 1.0 + params.cispo_eps_high
    weight = torch.clamp(rd, low, high)
    clipped = ((rd > high) | (rd < low)) & m
    return LossTerms(
        per_token=-adv * weight * inputs.logp,
        per_token_grad=-adv * weight,
        regions={"weight_clipped": clipped},
    )


def cispo_cap(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·sg[min(r, ε_max)]·ℓ per token, g_t = −A·min(r, ε_max)."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    rd = ratio(inputs).detach()
    weight = torch.clamp(rd, max=params.cispo_cap)
    capped = (rd > params.cispo_cap) & m
    return LossTerms(
        per_token=-adv * weight * inputs.logp,
        per_token_grad=-adv * weight,
        regions={"weight_capped": capped, "weight_capped_pos": capped & (adv > 0)},
    )


register(
    LossSpec(
        name="cispo",
        fn=cispo,
        formula="−A·sg[clip(r, 1−cispo_eps_low, 1+cispo_eps_high)]·log π_θ(y)",
        grad_formula="−A·clip(r, 1−cispo_eps_low, 1+cispo_eps_high)",
        zero_when="A = 0 (clipping rescales, never zeroes)",
        paper="CISPO, MiniMax-M1 arXiv 2506.13585 eqs. 4–5; verl `cispo`, slime "
        "compute_cispo_loss (relative bounds)",
        regions=("weight_clipped",),
        post_formula="clip(r)·|A|·(1 − π_y)",
    )
)
register(
    LossSpec(
        name="cispo_cap",
        fn=cispo_cap,
        formula="−A·sg[min(r, cispo_cap)]·log π_θ(y)",
        grad_formula="−A·min(r, cispo_cap)",
        zero_when="A = 0 (the cap rescales, never zeroes)",
        paper="CISPO as TRL loss_type=cispo (epsilon_high is an absolute cap ε_max; "
        "ScaleRL recommends 5)",
        regions=("weight_capped", "weight_capped_pos"),
        post_formula="min(r, cap)·|A|·(1 − π_y)",
    )
)
