"""Diagnostic 3: softmax is a zero-sum game.

Σ_v ∂L/∂z_{t,v} = c_t·(1 − Σ_v π_{t,v}) = 0 for every token, and therefore the rows of
∂L/∂W = Σ_t G_t h_tᵀ sum to the zero vector. Both are judged against the rounding bounds of
`tolerances` (z-loss, soft-capping or a bug that adds a non-softmax term breaks them). The sums
over the vocabulary are float64 `pairwise_sum`s, so that the check's own rounding is the one the
bounds assume, on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import num
from gradlens.results import ZeroSum
from gradlens.summation import pairwise_sum


def zero_sum(
    grad_logits: Tensor,
    grad_weight: Tensor,
    coefficient: Tensor,
    hidden: Tensor,
    logits: Tensor,
    entropy_bonus: bool = False,
) -> ZeroSum:
    """Check both sums. Shapes: [M, V], [V, H], [M] (c_t), [M, H], [M, V]; ``entropy_bonus``:
    ``grad_logits`` includes the entropy bonus's block."""
    m, v = grad_logits.shape
    # −inf marks a row outside a replayed kept set (π̃ = 0 there, no rounding to bound)
    finite_logits = logits.masked_fill(logits == -torch.inf, 0.0)
    max_abs_logit = float(finite_logits.abs().max()) if logits.numel() else 0.0
    finite = bool(torch.isfinite(grad_logits).all() and torch.isfinite(grad_weight).all())
    sums = pairwise_sum(grad_logits)  # [M]
    return judge(
        sums=sums.abs(),
        scale=coefficient.double().abs() + grad_logits.abs().amax(-1).double() if m else sums,
        row_sum=pairwise_sum(grad_weight, dim=0),
        total=grad_weight.double().norm(),
        hidden_norms=hidden.double().norm(dim=-1),
        accum=grad_logits.dtype,
        vocab=v,
        max_abs_logit=max_abs_logit,
        finite=finite,
        entropy_bonus=entropy_bonus,
    )


def judge(
    sums: Tensor,
    scale: Tensor,
    row_sum: Tensor,
    total: Tensor,
    hidden_norms: Tensor,
    accum: torch.dtype,
    vocab: int,
    max_abs_logit: float,
    finite: bool,
    dense: torch.dtype | None = None,
    entropy_bonus: bool = False,
    gemm_scale: Tensor | None = None,
) -> ZeroSum:
    """The verdict from the per-token sums |Σ_v ∂L/∂z_{t,v}| [M], their scales s_t [M], the
    row sum Σ_v ∂L/∂W_v [H] and ‖∂L/∂W‖_F; shared by the materialized and streamed paths.
    ``dense``: the streamed engine's GEMM dtype; ``entropy_bonus``: the gradients include it;
    ``gemm_scale`` [M]: g_t of `tolerances.zero_sum_products` (None: s_t)."""
    m = sums.numel()
    bonus = max_abs_logit if entropy_bonus else None
    tol_logits = tolerances.zero_sum_logits(accum, vocab, bonus)
    if not finite:
        return ZeroSum(
            logits_max_abs=None,
            logits_max_rel=None,
            logits_tolerance=tol_logits,
            weight_rel=None,
            weight_tolerance=0.0,
            passed=False,
        )
    rel = torch.where(scale > 0, sums / scale.clamp(min=1e-300), sums)
    row = row_sum.double().norm()
    gross = float((scale * hidden_norms).sum())  # Σ_t s_t‖h_t‖
    gross_gemm = gross if gemm_scale is None else float((gemm_scale * hidden_norms).sum())
    allowed = tol_logits * gross
    allowed += tolerances.zero_sum_products(accum, vocab, m, dense) * gross_gemm
    allowed += tolerances.zero_sum_underflow(accum, vocab, m, int(row_sum.numel()), dense)
    weight_rel = float(row / total) if float(total) > 0 else float(row)
    weight_tol = allowed / float(total) if float(total) > 0 else allowed
    logits_rel = float(rel.max()) if m else 0.0
    return ZeroSum(
        logits_max_abs=num(sums.max()) if m else 0.0,
        logits_max_rel=num(logits_rel),
        logits_tolerance=tol_logits,
        weight_rel=num(weight_rel),
        weight_tolerance=weight_tol,
        passed=logits_rel <= tol_logits and weight_rel <= weight_tol,
    )
