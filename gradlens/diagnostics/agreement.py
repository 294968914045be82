"""Diagnostic 6: the closed form against torch.autograd.

For c_t: max |closed − autograd| / max |autograd| (normwise, so that tiny entries cannot
inflate it). For ∂L/∂z and ∂L/∂W the difference is measured against the size of the terms the
two compute, not of their result: both round each term, so a result that cancels (two
sequences whose gradients are equal and opposite, a kept set where π̃(y) ≈ 1, so that
1 − π̃(y) is itself a rounding) differs by the terms' rounding however small it is, and a
relative error against it would fail a correct loss.

  ∂L/∂z: max |Δ| / max_t s_t, s_t = |c_t| + max_v |∂L/∂z_t,v| (an entry of c_t·(e_y − π_t)
         is at most |c_t|, rounded as such; the max covers what else a loss adds);
  ∂L/∂W: max |Δ| / max_v S_v, S_v = Σ_t a_t,v·‖h_t‖_∞ with a_t,v = |∂L/∂z_t,v| + |c_t|·[v = y_t]
         (row v sums its own terms: a row that only few tokens reach is judged by them, so an
         error in it is not diluted by the whole batch's size).

Without cancellation both are the result's own size within a small factor. The streamed
engines compare the row norms ‖∂L/∂W_v‖ the same way, with ‖h_t‖ for ‖h_t‖_∞ (a row norm's
rounding is at most that of its row; on a sample, |∂L/∂z_t,v| is taken as |c_t|·π_t,v, the
c-form's), and ∂L/∂z_y normwise relative as c_t. Each is judged against the per-dtype
tolerance of `tolerances.agreement`.
"""

from __future__ import annotations

from typing import Any

import torch

from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import max_ratio, rel_err
from gradlens.grads import LossGradients, ReferenceGradients
from gradlens.results import Agreement


def agreement(
    closed: LossGradients,
    reference: ReferenceGradients,
    mask: torch.Tensor,
    operand: torch.dtype,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
) -> Agreement:
    """Compare the three tensors (``hidden`` [M, H] and ``tokens`` [M]: the valid tokens' h_t
    and y_t); non-finite differences fail the check."""
    c = closed.coefficient[mask].double().abs()  # [M] |c_t|
    ref = reference.grad_logits.double()  # [M, V]
    errors = (
        rel_err(closed.coefficient[mask], reference.coefficient[mask]),
        max_ratio(closed.grad_logits.double() - ref, c + ref.abs().amax(-1)),  # s_t
        max_ratio(
            closed.grad_weight.double() - reference.grad_weight.double(),
            row_scales(ref, c, tokens, hidden.double().abs().amax(-1)),
        ),
    )
    return judged(errors, operand)


def row_scales(
    grad: torch.Tensor, c_abs: torch.Tensor, tokens: torch.Tensor, h_size: torch.Tensor
) -> torch.Tensor:
    """S_v [V] = Σ_t (|∂L/∂z_t,v| + |c_t|·[v = y_t])·|h_t|: the size of row v's terms, from
    ``grad`` [M, V], |c_t| and y_t [M], and ``h_size`` [M] (‖h_t‖_∞ for the entries of ∂L/∂W,
    ‖h_t‖ for its row norms)."""
    scale = grad.abs().T @ h_size  # [V]
    return scale.index_add(0, tokens, c_abs * h_size)


def judged(
    errors: tuple[float | None, float | None, float | None], operand: torch.dtype, **scope: Any
) -> Agreement:
    """The three relative errors (c_t, ∂L/∂z_y or ∂L/∂z, ∂L/∂W) against the operand dtype's
    tolerance; a missing (non-finite) error fails. ``scope``: the other `Agreement` fields (a
    sampled check's extent)."""
    tol = tolerances.agreement(operand)
    return Agreement(
        coefficient=errors[0],
        grad_logits=errors[1],
        grad_weight=errors[2],
        tolerance=tol,
        passed=within(errors, tol),
        **scope,
    )


def within(errors: tuple[float | None, ...], tolerance: float) -> bool:
    """Every error measured (a missing one is non-finite) and at most ``tolerance``."""
    return all(e is not None and e <= tolerance for e in errors)


def weight_unjudged(agreement: Agreement) -> Agreement:
    """``agreement`` with ∂L/∂W left out of the verdict: for a batch whose inputs make ∂L/∂W
    zero or rounding (`gradlens.compare.findings.signal`), where two correct summation orders
    keep different bits of it; c_t and ∂L/∂z, which the hidden states do not enter, are still
    judged."""
    judged_errors = (agreement.coefficient, agreement.grad_logits)
    return agreement.model_copy(
        update={"weight_judged": False, "passed": within(judged_errors, agreement.tolerance)}
    )


def not_run(operand: torch.dtype) -> Agreement:
    """The agreement of a run without an autograd reference (``diagnostics.reference: none``)."""
    return Agreement(
        coefficient=None,
        grad_logits=None,
        grad_weight=None,
        tolerance=tolerances.agreement(operand),
        passed=True,
        ran=False,
    )
