"""Diagnostics 1 and 3 from the streamed engine's per-token statistics (no [M, V] tensor).

For a loss of the c·(e_y − π) form, every number of `sampled_row` and `zero_sum` follows from
c_t and four per-token numbers the engine keeps — π_y, Σ_v π_v (summed from the entries it
exponentiated), max_{v≠y} π_v and max_v |z_v| — and from the running row sum Σ_v ∂L/∂W_v:

    ∂L/∂z_y = c·(1 − π_y)                Σ_{j≠y} |∂L/∂z_j| = |c|·(Σ_v π_v − π_y)
    max_{j≠y} |∂L/∂z_j| = |c|·max_{j≠y} π_j
    Σ_v ∂L/∂z_v = c·(1 − Σ_v π_v)
    s_t = |c| + max_v |∂L/∂z_v| = |c|·(1 + max(1 − π_y, max_{j≠y} π_j))

The tolerances are those of `tolerances`, exactly as for the materialized path: the engine
normalises π and sums Σ_v π and Σ_v ∂L/∂W_v as that path does (`gradlens.logits`,
`gradlens.summation`), so the verdict does not depend on the chunk size.

With the entropy bonus (E_v = a·c_H·π_v(log π_v + H), the same for every loss) the engine also
keeps E_y, Σ_v E_v and, per loss, Σ_{j≠y} |∂L/∂z_j| and max_{j≠y} |∂L/∂z_j|; then
∂L/∂z_y = c·(1 − π_y) + E_y and Σ_v ∂L/∂z_v = c·(1 − Σ_v π_v) + Σ_v E_v. As in `sampled_row`,
the post's formula is checked against autograd's ∂L/∂z_y minus E_y, and the zero-sum scale adds
the bonus's gross size 2·|c_H|·a·H (`gradlens.compare.materialized.zero_sum_scale`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num, rel_err
from gradlens.diagnostics.zero_sum import judge
from gradlens.engine.streamed import RowStats, TokenStats
from gradlens.results import SampledRow, ZeroSum


def grad_at_y(c: Tensor, stats: TokenStats) -> Tensor:
    """[M] ∂L/∂z_y: c·(1 − π_y), plus E_y with the entropy bonus."""
    at_y = c * (1 - stats.sampled_prob)
    return at_y if stats.entropy_grad_at_y is None else at_y + stats.entropy_grad_at_y


def sampled_row_streamed(
    c: Tensor,
    stats: TokenStats,
    post_formula: str,
    post: Tensor,
    reference_at_y: Tensor | None,
    rows: RowStats | None = None,
    reference_tokens: Tensor | None = None,
) -> SampledRow:
    """Diagnostic 1; ``post`` [M] is a_t·|g_t|·(1 − π_y), ``reference_at_y`` autograd's ∂L/∂z_y
    of every token, or of the tokens ``reference_tokens`` (indices into M) when it is given;
    ``rows`` the loss's engine rows (their per-token statistics with the entropy bonus)."""
    p_y = stats.sampled_prob
    at_y = grad_at_y(c, stats)  # [M]
    empty = at_y.numel() == 0
    if rows is not None and rows.other_mass is not None and rows.other_max is not None:
        assert stats.entropy_grad_at_y is not None
        other_mass, other_max = rows.other_mass, rows.other_max
        if reference_at_y is not None:  # the post's formula covers the policy term only
            bonus_at_y = stats.entropy_grad_at_y
            if reference_tokens is not None:
                bonus_at_y = bonus_at_y[reference_tokens]
            reference_at_y = reference_at_y - bonus_at_y.to(reference_at_y.dtype)
        post_formula += " (policy term; entropy bonus excluded)"
    else:
        other_mass, other_max = c.abs() * (stats.prob_sum - p_y), c.abs() * stats.max_other_prob
    post_checked = post if reference_tokens is None else post[reference_tokens]
    return SampledRow(
        post_formula=f"a_t·{post_formula}",
        sampled_abs_mean=None if empty else num(at_y.abs().mean()),
        sampled_abs_max=None if empty else num(at_y.abs().max()),
        other_mass_mean=None if empty else num(other_mass.mean()),
        other_abs_max=None if empty else num(other_max.max()),
        post_max_rel_err=None
        if empty or reference_at_y is None
        else rel_err(post_checked.double(), reference_at_y.abs()),
    )


def zero_sum_streamed(
    c: Tensor,
    stats: TokenStats,
    row_sum: Tensor,
    norms: Tensor,
    hidden_norms: Tensor,
    vocab: int,
    dense: torch.dtype,
    other_max: Tensor | None = None,
    bonus_scale: Tensor | None = None,
    gemm_scale: Tensor | None = None,
) -> ZeroSum:
    """Diagnostic 3 from the engine's statistics.

    With the entropy bonus, ``other_max`` [M] is the loss's max_{j≠y} |∂L/∂z_j| and
    ``bonus_scale`` [M] the bonus's gross size 2·|c_H|·a_t·H_t, added to s_t as the materialized
    path adds it.

    ``dense`` is the dtype of the engine's dense product: when it is narrower than the
    accumulation (bf16 operands), π and c⊙h are each rounded to it before the GEMM and the
    product after it, which adds at most 3·u_dense·Σ_t |c_t|·‖h_t‖ to ‖Σ_v ∂L/∂W_v‖
    (Σ_v π_tv = 1; `tolerances`). ``gemm_scale`` [M]: the engine's |c| of what entered this
    loss's dense products, when it reuses another loss's (`RowStats.gemm_scale`).
    """
    cd = c.double()
    sums = cd * (1 - stats.prob_sum.double())  # [M] Σ_v ∂L/∂z_v
    bonus = False
    if stats.entropy_grad_sum is not None and other_max is not None and bonus_scale is not None:
        bonus = True
        sums = sums + stats.entropy_grad_sum.double()
        largest = torch.maximum(grad_at_y(c, stats).double().abs(), other_max.double())
        scale = cd.abs() + bonus_scale.double() + largest
    else:
        largest = torch.maximum(1 - stats.sampled_prob.double(), stats.max_other_prob.double())
        scale = cd.abs() * (1 + largest)  # [M] s_t
    return judge(
        sums=sums.abs(),  # [M] |Σ_v ∂L/∂z_v|
        scale=scale,
        row_sum=row_sum,
        total=norms.double().norm(),
        hidden_norms=hidden_norms.double(),
        accum=c.dtype,
        vocab=vocab,
        max_abs_logit=float(stats.max_abs_logit.max()) if c.numel() else 0.0,
        finite=bool(
            torch.isfinite(norms).all()
            and torch.isfinite(row_sum).all()
            and torch.isfinite(c).all()
        ),
        dense=dense,
        entropy_bonus=bonus,
        gemm_scale=None if gemm_scale is None else scale + (gemm_scale.double() - cd.abs()),
    )
