"""REINFORCE (Williams 1992), as derived in the seed post.

Per-token loss (minimised):  ℓ^PG_t = −A_t · log π_θ(y_t)
Coefficient:                 g_t = ∂ℓ^PG_t/∂ℓ_t = −A_t
Logit gradient:              ∂/∂z_y = −A(1 − π_y) on the sampled row, +A·π_j on every other row,
                             so the rows sum to zero ("softmax is a zero-sum game").
Zero when:                   A_t = 0.

verl registers it as ``gpg`` (``compute_policy_loss_gpg``).
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def reinforce(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·log π_θ(y) per token, g_t = −A."""
    adv = torch.where(inputs.mask, inputs.advantages, 0.0)
    return LossTerms(per_token=-adv * inputs.logp, per_token_grad=-adv)


register(
    LossSpec(
        name="reinforce",
        fn=reinforce,
        formula="−A·log π_θ(y)",
        grad_formula="−A",
        zero_when="A = 0",
        paper="Williams 1992 (REINFORCE); verl `gpg`",
        post_formula="|A|·(1 − π_y)",
    )
)
