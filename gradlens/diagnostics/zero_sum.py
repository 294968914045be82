"""Diagnostic 3: softmax is a zero-sum game.

Σ_v ∂L/∂z_{t,v} = c_t·(1 − Σ_v π_{t,v}) = 0 for every token, and therefore the rows of
∂L/∂W = Σ_t G_t h_tᵀ sum to the zero vector. Both are judged against the rounding bounds of
`tolerances` (z-loss, soft-capping or a bug that adds a non-softmax term breaks them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import num
from gradlens.results import ZeroSum


def zero_sum(
    grad_logits: Tensor, grad_weight: Tensor, coefficient: Tensor, hidden: Tensor, logits: Tensor
) -> ZeroSum:
    """Check both sums. Shapes: [M, V], [V, H], [M] (c_t), [M, H], [M, V]."""
    accum = grad_logits.dtype
    m, v = grad_logits.shape
    max_abs_logit = float(logits.abs().max()) if logits.numel() else 0.0
    if not torch.isfinite(grad_logits).all() or not torch.isfinite(grad_weight).all():
        return ZeroSum(
            logits_max_abs=None,
            logits_max_rel=None,
            logits_tolerance=tolerances.zero_sum_logits(accum, v, max_abs_logit),
            weight_rel=None,
            weight_tolerance=0.0,
            passed=False,
        )
    g = grad_logits.double()
    sums = g.sum(-1).abs()  # [M]
    scale = coefficient.double().abs() + g.abs().amax(-1) if m else sums  # [M] s_t
    rel = torch.where(scale > 0, sums / scale.clamp(min=1e-300), sums)
    tol_logits = tolerances.zero_sum_logits(accum, v, max_abs_logit)

    row_sum = grad_weight.double().sum(0).norm()
    total = grad_weight.double().norm()
    gross = (scale * hidden.double().norm(dim=-1)).sum()  # Σ_t s_t‖h_t‖
    factor = tolerances.zero_sum_weight_factor(accum, v, m, max_abs_logit)
    weight_rel = float(row_sum / total) if float(total) > 0 else float(row_sum)
    weight_tol = float(factor * gross / total) if float(total) > 0 else float(factor * gross)

    logits_rel = float(rel.max()) if m else 0.0
    return ZeroSum(
        logits_max_abs=num(sums.max()) if m else 0.0,
        logits_max_rel=num(logits_rel),
        logits_tolerance=tol_logits,
        weight_rel=num(weight_rel),
        weight_tolerance=weight_tol,
        passed=logits_rel <= tol_logits and weight_rel <= weight_tol,
    )
