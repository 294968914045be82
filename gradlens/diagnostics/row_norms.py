"""Diagnostic 2: per-row norms of the lm_head gradient ∂L/∂W ∈ R^{V×H}.

Row v is Σ_{t: y_t = v} c_t h_t − Σ_t c_t π_{t,v} h_t: the rows of sampled tokens get the
first (large) term, all the others only the second (small when π_{t,v} ≈ 0). The report splits
the rows into those two groups and gives each group's count, share of ‖∂L/∂W‖²_F, max and
median, plus the top-k rows overall.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num
from gradlens.engine.norms import safe_row_norms
from gradlens.results import RowGroup, RowNorms, TopRow


def _group(norms: Tensor, total: Tensor) -> RowGroup:
    if norms.numel() == 0:
        return RowGroup(count=0, sq_share=None, max=None, median=None)
    return RowGroup(
        count=int(norms.numel()),
        # Σ (n_v/‖G‖)²: the squares of norms far below 1 (or above) would underflow (overflow)
        sq_share=num(((norms / total) ** 2).sum()) if float(total) > 0 else None,
        max=num(norms.max()),
        median=num(norms.median()),
    )


def row_norms(grad_weight: Tensor, sampled_tokens: Tensor, top_k: int) -> RowNorms:
    """Group and rank the rows of ``grad_weight`` [V, H]; ``sampled_tokens`` [M]."""
    return row_norms_from(safe_row_norms(grad_weight.double()), sampled_tokens, top_k)


def row_norms_from(norms: Tensor, sampled_tokens: Tensor, top_k: int) -> RowNorms:
    """The same from the row norms alone ([V]), as the streamed engine produces them."""
    norms = norms.double()
    is_sampled = torch.zeros_like(norms, dtype=torch.bool)
    is_sampled[sampled_tokens] = True
    total = safe_row_norms(norms[None, :])[0]  # ‖∂L/∂W‖_F = ‖(n_v)_v‖, without underflow
    ranked = torch.where(torch.isfinite(norms), norms, torch.inf)  # non-finite rows rank first
    k = min(top_k, norms.numel())
    _, idx = torch.topk(ranked, k)
    return RowNorms(
        total_norm=num(total),
        sampled_rows=_group(norms[is_sampled], total),
        other_rows=_group(norms[~is_sampled], total),
        top_rows=[
            TopRow(token=int(i), norm=num(norms[i]), sampled=bool(is_sampled[i])) for i in idx
        ],
    )
