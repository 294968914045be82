"""Diagnostic 6: the closed form against torch.autograd.

For c_t: max |closed − autograd| / max |autograd| (normwise, so that tiny entries cannot
inflate it). For ∂L/∂z and ∂L/∂W the difference is measured against the size of the terms the
two compute, not of their result: both round each term, so a result that cancels (two
sequences whose gradients are equal and opposite, a kept set where π̃(y) ≈ 1) differs by the
terms' rounding however small it is, and a relative error against it would fail a correct
loss. With s_t = |c_t| + max_v |∂L/∂z_t,v| (every entry of c_t·(e_y − π_t) is at most |c_t|; the
max covers what else a loss adds), the scale of ∂L/∂z is max_t s_t and that of ∂L/∂W, whose
entries are Σ_t ∂L/∂z_t,v·h_t,j, is max_j Σ_t s_t·|h_t,j| (of a row norm ‖∂L/∂W_v‖, Σ_t s_t·‖h_t‖).
Without cancellation these are the result's own size within a small factor. Each is judged
against the per-dtype tolerance of `tolerances.agreement`.
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
) -> Agreement:
    """Compare the three tensors (``hidden`` [M, H]: the tokens' h_t); non-finite differences
    fail the check."""
    c = closed.coefficient[mask].double()  # [M]
    ref = reference.grad_logits.double()  # [M, V]
    s = c.abs() + (ref.abs().amax(-1) if ref.numel() else torch.zeros_like(c))  # [M] s_t
    scale_w = s @ hidden.double().abs() if s.numel() else s.new_zeros(1)  # [H]
    errors = (
        rel_err(closed.coefficient[mask], reference.coefficient[mask]),
        max_ratio(closed.grad_logits.double() - ref, s),
        max_ratio(closed.grad_weight.double() - reference.grad_weight.double(), scale_w),
    )
    return judged(errors, operand)


def token_scale(c: torch.Tensor, at_y: torch.Tensor) -> torch.Tensor:
    """s_t [M] from what the streamed engine keeps: |c_t| + |∂L/∂z_t,y| (the largest entry of
    c_t·(e_y − π_t) is at most |c_t|; ∂L/∂z_y carries what else a loss adds there)."""
    return c.double().abs() + at_y.double().abs()


def row_norm_scale(s: torch.Tensor, hidden_norms: torch.Tensor) -> torch.Tensor:
    """Σ_t s_t·‖h_t‖: the size of the terms of every row norm ‖∂L/∂W_v‖ (a 1-element tensor)."""
    return (s * hidden_norms.double()).sum().reshape(1)


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
        passed=all(e is not None and e <= tol for e in errors),
        **scope,
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
