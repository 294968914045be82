"""ASPO: Asymmetric Importance Sampling Policy Optimization (Archer2.0, arXiv 2510.06062), as
``compute_policy_loss_archer`` in wizard-III/Archer2.0 (``verl/trainer/ppo/core_algos.py``,
b08d963) computes it, with its entropy-dependent clip widths.

Entropy-dependent widths (token selection). Per sequence, the tokens whose entropy H_t is above
the sequence's q-quantile (q = ``loss.aspo_entropy_quantile``, 0.8: the top 20 %) get the wide
width ε_H = ``loss.aspo_eps_high_entropy`` (0.4), the others the narrow ε_L =
``loss.aspo_eps_low_entropy`` (0.2), on both sides: ε⁺_t = ε⁻_t = ε_t. (Archer's variable
``high_entropy_mask`` is True for the *low*-entropy tokens, as its own comment says; the widths
it is given make the result the one described here.) Region ``high_entropy`` marks them.

With r = π_θ(y)/π_old(y), and c⁻, c⁺ = ``loss.aspo_clip_c_neg``, ``loss.aspo_clip_c_pos`` (3):

    A > 0 (flipped weight): per-token loss −A·(r̂/sg[r̂])/sg[r̂], r̂ = min(r, 1 + ε_t), whose
        gradient is −A/r: a rewarded token's weight is 1/r, *large* where π_θ fell below π_old.
        soft dual clip: where 1/r > c⁺ the loss is −A·c⁺·log π_θ(y) (weight capped at c⁺).
        g = −A·min(1/r, c⁺) if r ≤ 1 + ε_t, else 0            regions clip_dual_pos, clip_upper
    A < 0: per-token loss −A·max(r, 1 − ε_t), with the dual clip −A·c⁻·log π_θ(y) where r > c⁻
        (a kept gradient of weight c⁻, not PPO's zero):
        g = −A·r if 1 − ε_t ≤ r ≤ c⁻; −A·c⁻ if r > c⁻; 0 if r < 1 − ε_t
                                                                  regions clip_dual, clip_lower
Zero when: A = 0; A > 0 and r > 1 + ε_t; A < 0 and r < 1 − ε_t.

Exactly at a bound the token keeps its unclipped gradient (torch.clamp's inclusive pass-through,
as in the reference). Traps: Archer's call site does not pass ``loss_agg_mode``, so it always
aggregates with ``token-mean`` (gradlens applies ``loss.aggregation``: set ``token_mean``); the
entropy quantile is per sequence (TRL's top-entropy selection is per batch); Archer clamps log r
to ±20, gradlens does not. The loss needs per-token entropies: both engines compute them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def sequence_quantile_above(entropy: Tensor, mask: Tensor, q: float) -> Tensor:
    """[N, T] bool: H_t > the q-quantile of H over its sequence's valid tokens (linear
    interpolation, as torch.nanquantile); False at masked positions."""
    grid = torch.where(mask, entropy, torch.full_like(entropy, float("nan")))
    has = mask.any(-1, keepdim=True)
    # an empty row would make nanquantile NaN: give it zeros, its tokens are masked anyway
    grid = torch.where(has, grid, torch.zeros_like(grid))
    threshold = torch.nanquantile(grid, q, dim=-1, keepdim=True)  # [N, 1]
    return (entropy > threshold) & mask


def entropy_widths(inputs: TokenInputs, params: LossParams) -> tuple[Tensor, Tensor]:
    """([N, T] ε_t, [N, T] bool high-entropy tokens) of ASPO's entropy-dependent clip."""
    if inputs.entropy is None:
        raise GradlensError(
            "aspo's clip widths depend on each token's entropy, and this call has none "
            "(compare computes it on both engines; a direct caller passes TokenInputs.entropy)"
        )
    high = sequence_quantile_above(inputs.entropy, inputs.mask, params.aspo_entropy_quantile)
    eps = torch.where(
        high,
        torch.full_like(inputs.logp.detach(), params.aspo_eps_high_entropy),
        params.aspo_eps_low_entropy,
    )
    return eps, high


def aspo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """ASPO: flipped weight min(1/r, c⁺) for A > 0, dual clip keeping weight c⁻ for A < 0."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    eps, high = entropy_widths(inputs, params)
    r = ratio(inputs)
    rd = r.detach()
    c_neg, c_pos = params.aspo_clip_c_neg, params.aspo_clip_c_pos
    pos, neg = (adv > 0) & m, (adv < 0) & m
    regions = {
        "clip_upper": pos & (rd > 1.0 + eps),
        "clip_lower": neg & (rd < 1.0 - eps),
        "clip_dual": neg & (rd > c_neg),
        "clip_dual_pos": pos & (1.0 / rd > c_pos) & ~(rd > 1.0 + eps),
        "high_entropy": high,
    }
    logp = inputs.logp
    # A > 0: −A·(r/sg r)/sg r has the value −A/r and the gradient −A/r
    pos_loss = torch.where(
        regions["clip_upper"],
        -adv / (1.0 + eps),
        torch.where(regions["clip_dual_pos"], -adv * c_pos * logp, -adv * (r / rd) / rd),
    )
    pos_g = torch.where(
        regions["clip_upper"],
        0.0,
        torch.where(regions["clip_dual_pos"], -adv * c_pos, -adv / rd),
    )
    # A < 0: −A·max(r, 1 − ε), and −A·c⁻·ℓ beyond the dual clip
    neg_loss = torch.where(
        regions["clip_lower"],
        -adv * (1.0 - eps),
        torch.where(regions["clip_dual"], -adv * c_neg * logp, -adv * r),
    )
    neg_g = torch.where(
        regions["clip_lower"], 0.0, torch.where(regions["clip_dual"], -adv * c_neg, -adv * rd)
    )
    per_token = torch.where(pos, pos_loss, torch.where(neg, neg_loss, 0.0))
    grad = torch.where(pos, pos_g, torch.where(neg, neg_g, 0.0))
    return LossTerms(per_token=per_token, per_token_grad=grad, regions=regions)


register(
    LossSpec(
        name="aspo",
        fn=aspo,
        formula="A>0: −A·(r̂/sg r̂)/sg r̂, r̂ = min(r, 1+ε_t), soft dual clip −A·c⁺·ℓ; "
        "A<0: −A·max(r, 1−ε_t), dual clip −A·c⁻·ℓ; ε_t by the token's entropy",
        grad_formula="A>0: −A·min(1/r, c⁺)·1[r ≤ 1+ε_t]; A<0: −A·r (1−ε_t ≤ r ≤ c⁻), −A·c⁻ "
        "(r > c⁻), 0 (r < 1−ε_t)",
        zero_when="A = 0; A>0 ∧ r>1+ε_t; A<0 ∧ r<1−ε_t (ε_t = 0.2 or 0.4 by entropy)",
        paper="ASPO, Archer2.0 arXiv 2510.06062; compute_policy_loss_archer (b08d963)",
        regions=("clip_upper", "clip_lower", "clip_dual", "clip_dual_pos", "high_entropy"),
        post_formula="|g|·(1 − π_y), g = −A·min(1/r, c⁺) or −A·r or −A·c⁻",
        needs=("entropy",),
        coupling="sequence",
        rule_words=(
            ("clip_upper", "A > 0 and r > 1+ε_t (ε_t by the token's entropy)"),
            ("clip_lower", "A < 0 and r < 1−ε_t (ε_t by the token's entropy)"),
            ("clip_dual", "A < 0 and r > c⁻ (the weight c⁻ is kept)"),
            ("clip_dual_pos", "A > 0 and 1/r > c⁺ (the weight c⁺ is kept)"),
            ("high_entropy", "H above its sequence's quantile (wide width)"),
        ),
    )
)
