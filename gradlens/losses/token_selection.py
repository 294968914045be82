"""Top-entropy token selection (``loss.top_entropy_quantile``): train on the forking tokens only.

Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
Learning for LLM Reasoning" (arXiv 2506.01939) find that the policy gradient of the ~20 % of
tokens with the highest entropy carries the improvement. TRL applies it to every ``loss_type``
(``GRPOConfig.top_entropy_quantile`` ρ, ``get_high_entropy_mask``; ms-swift the same):

    h     = the (1 − ρ)-quantile of H_t over the batch's valid tokens (linear interpolation,
            torch.quantile), H_t = −Σ_v π_t,v log π_t,v of π_θ, detached
    S_t   = 1[H_t ≥ h]                                         (ρ = 1: off, every S_t = 1)
    policy term → S_t·(policy term),   g_t → S_t·g_t            the penalty (grpo's KL, the
                                                                 prime_* τ term) is kept
    entropy bonus → −c_H·Σ_t a_t·S_t·H_t                         "the same effective mask"

It composes with every loss, like the training–inference corrections, so it is a loss setting
and not a loss of its own: ``ppo_clip`` + ρ = 0.2 is what the paper trains. The direction of each
token's logit gradient is unchanged (S_t is a detached 0/1 weight), and the gradient stays
zero-sum. On a sequence-level loss (``gspo``, ``luspo``, ``gmpo``) the weight acts through its
sequence mean, as a correction's does: exact, since the per-token value and the aggregation
weight are constant within a sequence (TRL multiplies its (B, 1) sequence loss by the (B, T)
mask, the same thing under a sequence mean). A loss that aggregates itself (``real``, user and
verl-shaped functions) is left alone (ms-swift's mask multiplies REAL's zero per-token loss).
Region ``entropy_masked`` marks the valid tokens below the threshold.

Trap: TRL gathers the entropies across processes before the quantile, so the threshold is
per global batch; it is per micro-batch only without that gather. With the entropy bonus, TRL
divides the masked entropy sum by the masked token count (not by the run's normaliser) for
``grpo``/``bnpo``-style losses; gradlens keeps the run's aggregation weights a_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.corrections import weight_policy_part


def top_entropy_mask(inputs: TokenInputs, quantile: float) -> Tensor | None:
    """[N, T] bool S_t (True: the token keeps its gradient), or None when the selection is off."""
    if quantile >= 1.0:
        return None
    if inputs.entropy is None:
        raise GradlensError(
            "loss.top_entropy_quantile selects tokens by their entropy, and this call has none "
            "(compare computes it on both engines; a direct caller passes TokenInputs.entropy)"
        )
    m = inputs.mask
    values = inputs.entropy[m]  # [M]
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (inputs.entropy >= threshold) & m


def apply_token_selection(terms: LossTerms, inputs: TokenInputs, keep: Tensor | None) -> LossTerms:
    """``terms`` with the policy part multiplied by S_t = ``keep`` (`top_entropy_mask`;
    unchanged when it is None)."""
    if terms.self_aggregated or keep is None:
        return terms
    m = inputs.mask
    regions = {**terms.regions, "entropy_masked": m & ~keep}
    return weight_policy_part(terms, keep.to(terms.per_token.dtype), m, regions)


def bonus_weights(agg_weights: Tensor, keep: Tensor | None) -> Tensor:
    """[N, T] the entropy bonus's weights a_t·S_t (a_t itself when the selection is off)."""
    return agg_weights if keep is None else agg_weights * keep.to(agg_weights.dtype)
