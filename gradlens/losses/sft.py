"""Supervised fine-tuning cross-entropy, and two reweightings of it by the target's probability.

``sft`` — cross-entropy:
    Per-token loss (minimised):  ℓ^SFT_t = −log π_θ(y_t)
    Coefficient:                 g_t = −1
    Logit gradient:              π − e_y: −(1 − π_y) on the target row, +π_j on every other row.
    Zero when:                   never for a finite softmax (π_y < 1).
    This is REINFORCE with A ≡ 1 and π_old = π_θ (the seed post's reading of SFT). OpenRLHF
    ``SFTLoss`` / ``GPTLMLoss``, slime ``--loss-type sft_loss``.

``dft`` — Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning
Perspective with Reward Rectification", arXiv 2508.05629): SFT's gradient is a policy gradient
with the implicit reward 1/π_y, which explodes on unlikely targets; DFT rescales each token by
its own (detached) probability:
    per-token loss  −sg[π_y]·log π_θ(y)        g_t = −π_y
    The sampled-row gradient π_y(1 − π_y) peaks at π_y = 1/2 and vanishes at both ends.
    Zero when: never for 0 < π_y < 1 (→ 0 as π_y → 0). TRL ``SFTConfig(loss_type="dft")``
    (``dft_loss``: summed, divided by the token count: ``token_mean``); Liger
    ``use_token_scaling=True``.

``chord`` — CHORD's token weight φ = p(1 − p) on its SFT term (arXiv 2508.11408; ms-swift
``chord_enable_phi_function``, ``compute_chord_loss``):
    per-token loss  −sg[π_y(1 − π_y)]·log π_θ(y)    g_t = −π_y(1 − π_y)
    It damps both confident tokens (already learned) and very unlikely ones (off-distribution).
    Zero when: never for 0 < π_y < 1. CHORD mixes (1 − μ)·L_RL + μ·L_SFT over two different
    batches (rollouts and expert data) with a scheduled μ; gradlens's ``chord`` is the SFT term
    alone (multiply by μ for its share). ms-swift divides it by the expert token count.

The advantages are ignored by all three (``uses_advantage=False``).
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def sft(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−log π_θ(y) per token, g_t = −1 (the advantages are ignored)."""
    one = inputs.mask.to(inputs.logp.dtype)
    return LossTerms(per_token=-one * inputs.logp, per_token_grad=-one)


def dft(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−sg[π_y]·log π_θ(y) per token, g_t = −π_y."""
    g = torch.where(inputs.mask, -torch.exp(inputs.logp.detach()), 0.0)
    return LossTerms(per_token=g * inputs.logp, per_token_grad=g)


def chord(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−sg[π_y(1 − π_y)]·log π_θ(y) per token, g_t = −π_y(1 − π_y)."""
    p = torch.exp(inputs.logp.detach())
    g = torch.where(inputs.mask, -p * (1.0 - p), 0.0)
    return LossTerms(per_token=g * inputs.logp, per_token_grad=g)


register(
    LossSpec(
        name="sft",
        fn=sft,
        formula="−log π_θ(y)",
        grad_formula="−1",
        zero_when="never (π_y < 1)",
        paper="cross-entropy; the seed post: REINFORCE with R = 1",
        post_formula="(1 − π_y)",
        uses_advantage=False,
    )
)
register(
    LossSpec(
        name="dft",
        fn=dft,
        formula="−sg[π_θ(y)]·log π_θ(y)",
        grad_formula="−π_y",
        zero_when="never for 0 < π_y < 1 (→ 0 as π_y → 0)",
        paper="DFT arXiv 2508.05629; TRL SFTConfig(loss_type='dft'), Liger use_token_scaling",
        post_formula="π_y·(1 − π_y)",
        uses_advantage=False,
    )
)
register(
    LossSpec(
        name="chord",
        fn=chord,
        formula="−sg[π_y(1 − π_y)]·log π_θ(y) (CHORD's φ-weighted SFT term; × μ in the mix)",
        grad_formula="−π_y(1 − π_y)",
        zero_when="never for 0 < π_y < 1 (→ 0 at both ends)",
        paper="CHORD arXiv 2508.11408; ms-swift chord_enable_phi_function",
        post_formula="π_y·(1 − π_y)²",
        uses_advantage=False,
    )
)
