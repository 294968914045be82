"""Diagnostic 1: the sampled token's logit gradient against every other token's.

For one token the post derives |∂L/∂z_y| = |c|·(1 − π_y) and ∂L/∂z_j = −c·π_j (j ≠ y), so
the gradient mass on the other rows, Σ_{j≠y}|∂L/∂z_j| = |c|·(1 − π_y), equals the sampled
row's: the zero-sum game. The post's formula a_t·|g_t|·(1 − π_y) is checked against the logit
gradient that autograd produced, not against the closed form it would trivially match.

With an entropy bonus (``loss.entropy_coef``) the logit gradient has a second term that is not
of the form c·(e_y − π); every number here still describes the whole gradient, except the
post's formula, which is checked against autograd's gradient minus the bonus's closed-form
part (itself checked by the agreement diagnostic) and says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num, rel_err
from gradlens.grads import LossGradients, SoftmaxView
from gradlens.results import SampledRow


def sampled_row(
    view: SoftmaxView,
    grads: LossGradients,
    reference_grad_logits: Tensor | None,
    post_formula: str,
) -> SampledRow:
    """Sampled-row and other-row statistics over the valid tokens."""
    g = grads.grad_logits  # [M, V]
    at_y = g.gather(-1, view.tokens[:, None]).squeeze(-1)  # [M]
    others = g.scatter(-1, view.tokens[:, None], 0.0).abs()  # [M, V], 0 on the sampled row
    a = grads.weights[view.rows, view.cols]  # [M]
    gt = grads.terms.per_token_grad[view.rows, view.cols]  # [M]
    post = a * gt.abs() * (1 - view.sampled_probs)  # [M] the post's closed form
    reference = reference_grad_logits
    if grads.entropy_grad_logits is not None:  # the post's formula covers the policy term only
        if reference is not None:
            reference = reference - grads.entropy_grad_logits.to(reference.dtype)
        post_formula += " (policy term; entropy bonus excluded)"
    ref_at_y = (
        None if reference is None else reference.gather(-1, view.tokens[:, None]).squeeze(-1).abs()
    )
    empty = at_y.numel() == 0
    return SampledRow(
        post_formula=f"a_t·{post_formula}",
        sampled_abs_mean=None if empty else num(at_y.abs().mean()),
        sampled_abs_max=None if empty else num(at_y.abs().max()),
        other_mass_mean=None if empty else num(others.sum(-1).mean()),
        other_abs_max=None if empty else num(others.max()),
        post_max_rel_err=None
        if empty or ref_at_y is None
        else rel_err(post.to(torch.float64), ref_at_y),
    )
