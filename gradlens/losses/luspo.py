"""LUSPO: Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261), as TRL's
``loss_type="luspo"`` computes it (``GRPOTrainer._compute_loss``, f2cd577).

GSPO's sequence loss (``gspo``, losses.md §2.7), multiplied by the sequence's length |y_i|, then
averaged over sequences. GSPO's geometric-mean ratio s_i spreads its gradient over the |y_i|
tokens (∂s_i/∂ℓ_t = s_i/|y_i|), so under a mean over sequences a token of a long sequence gets
less gradient than one of a short sequence; the factor |y_i| removes that length bias:

    sequence loss   |y_i|·max(−Â_i·s_i, −Â_i·clip(s_i, 1 − eps_low, 1 + eps_high))
    g_t             = −|y_i|·Â_i·s_i·M_i            (gspo's g times |y_i|)

With ``seq_mean_token_mean`` (a = 1/(B'·|y_i|)) every token gets c_t = −Â_i·s_i·M_i/B', the
same for every token of the batch whatever its sequence's length: TRL's
``(per_token_loss · |y_i|).mean()`` over sequences. Use that aggregation to reproduce TRL; under
``token_mean`` the length counts twice.
Zero when: Â_i = 0 or the sequence is clipped (M_i = 0; gspo's rule, whole sequences).

TRL requires ``importance_sampling_level="sequence"`` for it; the paper's clip widths are
eps_low = 2e-3, eps_high = 2.5e-3 (gradlens's shared defaults 0.2/0.28 rarely clip a geometric
mean: ``--set loss.eps_low=2e-3 --set loss.eps_high=2.5e-3``). TRL divides by the gradient
accumulation steps, not by a token count.
"""

from __future__ import annotations

import dataclasses

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.gspo import gspo
from gradlens.losses.registry import register


def luspo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """gspo's sequence loss × |y_i|; g_t = −|y_i|·Â_i·s_i·M_i."""
    base = gspo(inputs, params)
    lengths = inputs.mask.sum(-1, keepdim=True).to(base.per_token.dtype)  # [N, 1] |y_i|
    return dataclasses.replace(
        base, per_token=lengths * base.per_token, per_token_grad=lengths * base.per_token_grad
    )


register(
    LossSpec(
        name="luspo",
        fn=luspo,
        formula="|y_i|·max(−Â_i·s_i, −Â_i·clip(s_i, 1−eps_low, 1+eps_high)) per sequence",
        grad_formula="−|y_i|·Â_i·s_i·M_i on every token of sequence i",
        zero_when="Â_i = 0; the sequence is clipped (gspo's rule)",
        paper="LUSPO arXiv 2602.05261; TRL loss_type=luspo (importance_sampling_level=sequence)",
        regions=("clip_upper", "clip_lower", "seq_clipped"),
        post_formula="|y_i|·M_i·s_i·|Â_i|·(1 − π_y)",
        coupling="sequence",
    )
)
