"""Diagnostic 6: the closed form against torch.autograd.

For c_t, ∂L/∂z and ∂L/∂W: max |closed − autograd| / max |autograd| (normwise, so that tiny
entries cannot inflate it), judged against the per-dtype tolerance of `tolerances.agreement`.
"""

from __future__ import annotations

from typing import Any

import torch

from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import rel_err
from gradlens.grads import LossGradients, ReferenceGradients
from gradlens.results import Agreement


def agreement(
    closed: LossGradients, reference: ReferenceGradients, mask: torch.Tensor, operand: torch.dtype
) -> Agreement:
    """Compare the three tensors; non-finite differences fail the check."""
    errors = (
        rel_err(closed.coefficient[mask], reference.coefficient[mask]),
        rel_err(closed.grad_logits, reference.grad_logits),
        rel_err(closed.grad_weight, reference.grad_weight),
    )
    return judged(errors, operand)


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
