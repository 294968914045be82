"""The slow twin of the curves: torch.autograd on an explicit distribution at a subset of points.

At each checked point a distribution over V tokens (``check.vocab_size``, 8 by default) is
written out: token 0 is the sampled y with probability π_θ(y), the other V − 1 tokens share
1 − π_θ(y) equally, and the logits are z = log π. (With a kept set, S_θ < 1, the first V // 2
tokens are K_t: y and V // 2 − 1 others sharing S_θ − π_θ(y), the rest sharing 1 − S_θ;
`gradlens.sweep.support.explicit_probs`.) The loss a·(per-token loss) of a lone token is
differentiated through log_softmax(z) with torch.autograd, as a trainer would — or, on a
replayed support, through z_y − logsumexp(z[K_t]), the log-prob of π restricted to K_t and
renormalised, written independently of the closed form's division by S_θ — and the result is
compared with the curve's closed form (p = π_θ, or π̃_θ when replayed):

    sampled row   ∂L/∂z_y            vs  c·(1 − p(y))
    other rows    Σ_{j≠y} |∂L/∂z_j|  vs  |c|·(1 − p(y))   (every row, those outside K_t too:
                                                           a gradient leaking there adds to it)

The error of a point is |autograd − closed| / max(|autograd|, |closed|) for each row, and 0
when both are exactly 0 — so a rule that switches a token off must do so on both paths.

The points are laid out as the curves lay them out (`gradlens.sweep.curves.point_terms`): a
group-coupled loss (``real``) gets the point's other sign of A as its group partner, with a
constant log-prob, so that autograd differentiates the group's loss with respect to this
token alone; a batch-coupled loss is called on each point alone.

The log-prob fed to the loss has exactly the value ℓ that the curve used and the
derivative of log_softmax(z)_y (``value + (ls − ls.detach())``). Otherwise the two paths would
compute r from log-probs one rounding apart, and a point lying exactly on a clip boundary
(r = 1 + ε_high, easy to hit on a linear grid) could be clipped on one path and not on the
other: a difference in the input, not in the formula.

Which points: `Grid.pick` — ``check.points`` evenly spaced indices per swept axis, both ends
included (9 by default; 81 on a 2-D grid), for every loss, variant and sign of A.
Tolerance: float64 closed form vs autograd, `gradlens.diagnostics.tolerances.agreement`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.diagnostics.tolerances import agreement
from gradlens.losses import get_loss
from gradlens.sweep.curves import Curve, point_terms
from gradlens.sweep.grid import Grid
from gradlens.sweep.support import explicit_entropy, explicit_probs, kept_count, loss_log_probs

TOLERANCE = agreement(torch.float64)


@dataclass(frozen=True)
class CurveCheck:
    """Autograd at the checked points of one curve.

    Attributes:
        curve: the curve checked.
        indices: [K] flat grid indices of the checked points.
        grad_sampled: [K] ∂L/∂z_y by autograd.
        grad_other_mass: [K] Σ_{j≠y} |∂L/∂z_j| by autograd.
        rel_err: [K] the larger of the two rows' relative errors.
    """

    curve: Curve
    indices: Tensor
    grad_sampled: Tensor
    grad_other_mass: Tensor
    rel_err: Tensor


def explicit_logits(pi_theta: Tensor, vocab_size: int, kept_mass: float = 1.0) -> Tensor:
    """[K, V] z = log π_θ of `explicit_probs` (−inf where a token has probability 0)."""
    return torch.log(explicit_probs(pi_theta, kept_mass, vocab_size))


def relative_error(actual: Tensor, expected: Tensor) -> Tensor:
    """Elementwise |a − b| / max(|a|, |b|), 0 where both are 0; NaN where either is NaN (a
    gradient that is not a number agrees with nothing, and `check_summary` fails on it)."""
    scale = torch.maximum(actual.abs(), expected.abs())
    diff = (actual - expected).abs()
    err = torch.where(scale > 0, diff / torch.where(scale > 0, scale, 1.0), 0.0)
    return torch.where(actual.isnan() | expected.isnan(), torch.nan, err)


def check_curve(grid: Grid, curve: Curve, indices: Tensor, vocab_size: int) -> CurveCheck:
    """Differentiate the loss of ``curve`` with autograd at the points ``indices``."""
    config = curve.variant.config
    support = config.point_support()
    pi_theta = grid.pi_theta[indices]  # [K]
    pi_old = grid.pi_old[indices]  # [K]
    z = explicit_logits(pi_theta, vocab_size, support.kept_mass).requires_grad_(True)  # [K, V]
    if support.replayed:  # log π̃(y) = z_y − log Σ_{v∈K_t} e^{z_v}: only the kept logits enter
        kept = kept_count(support.kept_mass, vocab_size)
        sampled = z[:, :1] - torch.logsumexp(z[:, :kept], dim=-1, keepdim=True)  # [K, 1]
    else:
        sampled = torch.log_softmax(z, dim=-1)[:, :1]  # [K, 1]
    value, old_value = loss_log_probs(pi_old, pi_theta, support)  # [K] each, the curve's
    exact = value[:, None]  # [K, 1]
    logp = exact + (sampled - sampled.detach())  # value exact, derivative of the log-prob
    inputs = TokenInputs(
        logp=logp,
        old_logp=old_value[:, None],
        advantages=torch.full_like(exact, curve.advantage),
        mask=torch.ones_like(exact, dtype=torch.bool),
        entropy=explicit_entropy(pi_theta, support, vocab_size)[:, None],
    )
    spec = get_loss(curve.loss)
    params, aggregation = config.loss.params(), config.loss.token_aggregation()
    if spec.coupling == "group":  # the point's other sign joins its group, as on the curve
        other = TokenInputs(
            logp=logp.detach(),
            old_logp=inputs.old_logp,
            advantages=-inputs.advantages,
            mask=inputs.mask,
            entropy=inputs.entropy,
        )
        both = TokenInputs(
            logp=torch.cat([logp, other.logp]),
            old_logp=torch.cat([inputs.old_logp, other.old_logp]),
            advantages=torch.cat([inputs.advantages, other.advantages]),
            mask=torch.cat([inputs.mask, other.mask]),
            entropy=torch.cat([inputs.entropy, other.entropy]),  # type: ignore[list-item]
        )
        # the whole group's loss; the other sign's ℓ is a constant (detached), so autograd
        # gives ∂L_g/∂ℓ of this point's token only, as the curve's c is
        terms = point_terms(spec, params, aggregation, both)
    else:
        terms = point_terms(spec, params, aggregation, inputs)
    loss = (curve.weight * terms.per_token).sum()
    if loss.requires_grad:  # a loss constant in ℓ at every point has no graph to walk
        loss.backward()
    grad = z.grad.detach() if z.grad is not None else torch.zeros_like(z.detach())  # [K, V]
    auto_sampled, auto_other = grad[:, 0], grad[:, 1:].abs().sum(-1)  # [K] each
    err = torch.maximum(
        relative_error(auto_sampled, curve.grad_sampled[indices]),
        relative_error(auto_other, curve.grad_other_mass[indices]),
    )
    return CurveCheck(curve, indices, auto_sampled, auto_other, err)


def check_curves(
    grid: Grid, curves: list[Curve], per_axis: int, vocab_size: int
) -> list[CurveCheck]:
    """The autograd check of every curve at the same regular subset of the grid."""
    indices = grid.pick(per_axis)
    if indices.numel() == 0:
        return []
    return [check_curve(grid, curve, indices, vocab_size) for curve in curves]
