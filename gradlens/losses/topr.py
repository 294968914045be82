"""TOPR: Tapered Off-Policy REINFORCE (Le Roux et al., arXiv 2503.14286, eq. 8), as ROLL's
``_compute_topr_loss`` (``roll/pipeline/rlvr/actor_pg_worker.py``, 8eb27cc) computes it.

Positive trajectories get a plain SFT-like REINFORCE update with no importance weight; negative
ones get truncated importance sampling with the weight clipped to [0, 1], so a stale negative
sample can only be down-weighted, never amplified:

    A > 0:   per-token loss  −w⁺·A·log π_θ(y)                 g = −w⁺·A
    A ≤ 0:   per-token loss  −w⁻·A·sg[min(r, 1)]·log π_θ(y)    g = −w⁻·A·min(r, 1)

with r = π_θ(y)/π_old(y), w⁺, w⁻ = ``loss.topr_pos_weight``, ``loss.topr_neg_weight`` (1, 1).
Region ``ratio_truncated`` marks the negative tokens whose weight was cut to 1 (ROLL's
``topr_negative_upper_clipfrac``).
Zero when: A = 0.

Trap: ROLL splits positive from negative by the reward score (R > 0), and the paper's update
uses R with no baseline; gradlens splits by the sign of the advantage it is given. They agree
for binary rewards with group-mean-centred advantages (R = 1 ⇒ A ≥ 0, R = 0 ⇒ A ≤ 0) except
where A = 0, whose gradient is 0 either way; they differ for rewards in between.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def topr(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−w⁺·A·ℓ for A > 0, −w⁻·A·sg[min(r, 1)]·ℓ for A ≤ 0."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    rd = ratio(inputs).detach()
    pos = adv > 0
    weight = torch.where(
        pos,
        torch.full_like(rd, params.topr_pos_weight),
        params.topr_neg_weight * torch.clamp(rd, max=1.0),
    )
    g = torch.where(m, -adv * weight, 0.0)
    truncated = (adv < 0) & (rd > 1.0) & m
    return LossTerms(
        per_token=g * inputs.logp, per_token_grad=g, regions={"ratio_truncated": truncated}
    )


register(
    LossSpec(
        name="topr",
        fn=topr,
        formula="A>0: −w⁺·A·log π_θ(y); A≤0: −w⁻·A·sg[min(r, 1)]·log π_θ(y)",
        grad_formula="−w⁺·A (A>0); −w⁻·A·min(r, 1) (A≤0)",
        zero_when="A = 0",
        paper="TOPR arXiv 2503.14286 eq. 8; ROLL pg_variant=topr (splits by reward R > 0)",
        regions=("ratio_truncated",),
        post_formula="w·|A|·(1 − π_y), w = w⁺ or w⁻·min(r, 1)",
    )
)
