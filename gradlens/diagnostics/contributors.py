"""Which sequences and tokens carry a loss's logit gradient: the largest contributors.

Every loss in scope sends g_t = c_t·(e_y − π_t) to the logits of token t, whose norm is exact
from one softmax:

    ‖g_t‖₂² = c_t²·((1 − π_y)² + Σ_{j≠y} π_j²) = c_t²·(1 − 2π_y + Σ_j π_j²)

A token's share is ‖g_t‖ / Σ_s ‖g_s‖ over the batch's valid tokens; a sequence's share is the
sum of its tokens'. (The lm_head gradient Σ_t g_t h_tᵀ is not additive in norm, so shares of
‖g_t‖ are what can be attributed exactly.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.results.trace import SequenceContribution, TokenContribution

Decode = Callable[[list[int]], str]


def token_grad_norms(coefficient: Tensor, sampled_prob: Tensor, sum_sq_prob: Tensor) -> Tensor:
    """‖c(e_y − π)‖₂ per token, from c_t, π_y and Σπ² (same shapes)."""
    spread = (1.0 - 2.0 * sampled_prob + sum_sq_prob).clamp(min=0.0)
    return coefficient.abs() * spread.sqrt()


def contributors(
    coefficient: Tensor,
    norms: Tensor,
    tokens: Tensor,
    mask: Tensor,
    advantages: Tensor,
    ratio: Tensor | None,
    top_k: int,
    decode: Decode | None = None,
) -> tuple[list[SequenceContribution], list[TokenContribution]]:
    """The ``top_k`` sequences and tokens by share of Σ‖g_t‖ (all [N, T]; norms 0 off-mask)."""
    m = mask.bool()
    norms = torch.where(m, norms.double(), 0.0)
    total = float(norms.sum())
    if total <= 0:
        return [], []
    per_seq = norms.sum(-1)
    seqs = []
    for i in per_seq.argsort(descending=True)[:top_k].tolist():
        valid = m[i]
        text = decode(tokens[i][valid].tolist()) if decode is not None else None
        seqs.append(
            SequenceContribution(
                sequence=i,
                tokens=int(valid.sum()),
                advantage=float(advantages[i][valid].double().mean()) if valid.any() else 0.0,
                grad_norm_sum=float(per_seq[i]),
                share=float(per_seq[i]) / total,
                text=text,
            )
        )
    flat = norms.flatten()
    k = min(top_k, int(m.sum()))
    toks = []
    width = norms.shape[1]
    for index in flat.argsort(descending=True)[:k].tolist():
        i, t = divmod(index, width)
        token = int(tokens[i, t])
        toks.append(
            TokenContribution(
                sequence=i,
                position=t,
                token=token,
                text=decode([token]) if decode is not None else None,
                advantage=float(advantages[i, t]),
                ratio=None if ratio is None else float(ratio[i, t]),
                coefficient=float(coefficient[i, t]),
                grad_norm=float(norms[i, t]),
                share=float(norms[i, t]) / total,
            )
        )
    return seqs, toks
