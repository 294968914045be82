"""Supervised fine-tuning cross-entropy.

Per-token loss (minimised):  ℓ^SFT_t = −log π_θ(y_t)
Coefficient:                 g_t = −1
Logit gradient:              π − e_y: −(1 − π_y) on the target row, +π_j on every other row.
Zero when:                   never for a finite softmax (π_y < 1).

This is REINFORCE with A ≡ 1 and π_old = π_θ (the seed post's reading of SFT). OpenRLHF
``SFTLoss`` / ``GPTLMLoss``, slime ``--loss-type sft_loss``.
"""

from __future__ import annotations

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def sft(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−log π_θ(y) per token, g_t = −1 (the advantages are ignored)."""
    one = inputs.mask.to(inputs.logp.dtype)
    return LossTerms(per_token=-one * inputs.logp, per_token_grad=-one)


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
