"""The figure's data: tokens over (log10 π_old(y_t), log ρ_t), and the corrections' bounds in
log ρ.

Histogram: log10 π_old in 32 bins of a quarter decade over [−8, 0] (a token below 1e-8 counts
in the first bin), log ρ in 41 bins over [−R, R] with R = max(max_t |Δ_t|, ln 1.2): the whole
gap and at least TRL issue 6789's band [0.9, 1.1] fit. Every valid token with a finite Δ counts
once.

Lines: a token-level correction thresholds ρ_t itself, so its bounds are values of log ρ —
TIS and MIS ln(high) (and ln(low) when set), IcePop ln(low) and ln(high), the band ln 0.9 and
ln 1.1 — and verl's token_k3 rejection keeps k3 = e^{x} − 1 − x ≤ h, two roots x₋ < 0 < x₊
(found by Newton's method from ±√(2h), where k3 ≈ ½x²). Sequence-level corrections (sequence
MIS, the geometric mask) threshold a sequence's statistic and have no line on a token axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradlens.diagnostics.worst_tokens import correction_label
from gradlens.losses.base import Correction
from gradlens.results import MismatchHistogram, ThresholdLine

X_RANGE = (-8.0, 0.0)
X_BINS = 32
Y_BINS = 41
MIN_RANGE = math.log(1.2)
RATIO_KINDS = ("token_tis", "token_mis", "icepop")  # bounds on ρ_t itself


def k3_roots(h: float) -> tuple[float, float]:
    """x₋ < 0 < x₊ with e^x − 1 − x = h (h > 0), by Newton's method from ±√(2h)."""
    roots = []
    for sign in (-1.0, 1.0):
        x = sign * math.sqrt(2 * h)
        for _ in range(100):
            step = (math.exp(x) - 1 - x - h) / (math.exp(x) - 1)
            x -= step
            if abs(step) < 1e-15 * max(1.0, abs(x)):
                break
        roots.append(x)
    return roots[0], roots[1]


def threshold_lines(
    corrections: tuple[Correction, ...], band: tuple[float, float]
) -> list[ThresholdLine]:
    """The module docstring's lines, the band's first."""
    name = f"band [{band[0]:g}, {band[1]:g}]"
    lines = [ThresholdLine(correction=name, log_rho=math.log(b)) for b in band]
    for c in corrections:
        label = correction_label(c)
        if c.kind in RATIO_KINDS:
            for bound in (c.low, c.high):
                if bound is not None and bound > 0:
                    lines.append(ThresholdLine(correction=label, log_rho=math.log(bound)))
        elif c.kind == "token_k3" and c.high is not None and c.high > 0:
            lines += [ThresholdLine(correction=label, log_rho=x) for x in k3_roots(c.high)]
    return lines


def mismatch_histogram(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor
) -> MismatchHistogram | None:
    """The module docstring's histogram, None without a valid token."""
    old, roll = old_logp.double().cpu(), rollout_logp.double().cpu()
    delta = old - roll
    valid = mask.cpu() & torch.isfinite(delta)
    if not bool(valid.any()):
        return None
    x = (old[valid] / math.log(10)).clamp(*X_RANGE)
    y = delta[valid]
    reach = max(float(y.abs().max()), MIN_RANGE)
    x_edges = torch.linspace(*X_RANGE, X_BINS + 1, dtype=torch.float64)
    y_edges = torch.linspace(-reach, reach, Y_BINS + 1, dtype=torch.float64)
    xi = torch.bucketize(x, x_edges[1:-1], right=True)
    yi = torch.bucketize(y, y_edges[1:-1], right=True)
    counts = torch.zeros(Y_BINS * X_BINS, dtype=torch.long)
    counts.index_add_(0, yi * X_BINS + xi, torch.ones_like(xi))
    return MismatchHistogram(
        x_edges=x_edges.tolist(),
        y_edges=y_edges.tolist(),
        counts=counts.view(Y_BINS, X_BINS).tolist(),
    )
