"""Per curve: where the gradient is zero, where it is more than 10× REINFORCE's, and its maximum.

On a 1-D sweep "where" is a list of runs of consecutive grid points, each given by the first
and last swept value in it (the true boundary lies between that point and its neighbour, so
it is known to the grid spacing: 5 % with the default 50 points per decade). On a 2-D grid it
is the share of the grid (the runs are None); the heat map shows the shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num
from gradlens.sweep.check import CurveCheck
from gradlens.sweep.curves import Curve
from gradlens.sweep.grid import Grid
from gradlens.sweep.results import CurveSummary, Interval, ZeroRun

# "More than 10× REINFORCE" (the threshold, and the one `compare` reports findings at):
# one token then outweighs ten on-policy tokens of the same batch. Its reciprocal marks the
# opposite failure, a token that barely counts (the seed post's rollout "fed to the dog").
AMPLIFIED_ABOVE = 10.0


def runs(flags: Tensor) -> list[tuple[int, int]]:
    """(first, last) index of every run of consecutive True entries of a [P] bool tensor."""
    padded = torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).to(torch.int8)
    steps = padded.diff()  # [P + 1]: +1 where a run starts, −1 just after it ends
    starts = torch.nonzero(steps == 1).flatten().tolist()
    ends = (torch.nonzero(steps == -1).flatten() - 1).tolist()
    return list(zip(starts, ends, strict=True))


def intervals(grid: Grid, flags: Tensor) -> list[Interval] | None:
    """The runs of ``flags`` in the swept variable (1-D sweeps; None for a 2-D grid)."""
    if grid.is_2d:
        return None
    x = grid.x.values
    return [Interval(low=float(x[a]), high=float(x[b])) for a, b in runs(flags)]


def zero_runs(grid: Grid, curve: Curve) -> list[ZeroRun] | None:
    """The runs where ∂L/∂z_y = 0, each with its cause (1-D sweeps; None for a 2-D grid)."""
    if grid.is_2d:
        return None
    x = grid.x.values
    out = []
    for a, b in runs(curve.zero):
        part = slice(a, b + 1)
        rules = [name for name, mask in curve.regions.items() if bool(mask[part].any())]
        if rules:
            cause = "+".join(rules)
        elif bool((curve.pi_sampled[part] == 1).all()):  # π_θ(y) = 1, or = S_θ when replayed
            replayed = curve.variant.config.loss.sampling_support == "kept"
            cause = "1 − π̃_θ = 0" if replayed else "1 − π_θ = 0"
        else:
            cause = "g = 0"
        out.append(ZeroRun(low=float(x[a]), high=float(x[b]), cause=cause))
    return out


def summarize(grid: Grid, curve: Curve, check: CurveCheck | None) -> CurveSummary:
    """The `CurveSummary` of one curve."""
    size = grid.pi_old.numel()
    magnitude = curve.grad_sampled.abs()
    finite = torch.where(torch.isfinite(magnitude), magnitude, -1.0)
    at = int(finite.argmax())
    has_max = bool(finite[at] >= 0)
    amp = curve.amplification
    amplified_runs: list[Interval] | None = None
    damped_runs: list[Interval] | None = None
    amplified_share: float | None = None
    max_amp: float | None = None
    min_amp: float | None = None
    if curve.uses_advantage:
        amplified = amp > AMPLIFIED_ABOVE
        amplified_runs = intervals(grid, amplified)
        damped_runs = intervals(grid, (amp > 0) & (amp < 1 / AMPLIFIED_ABOVE))
        amplified_share = float(amplified.sum()) / size
        finite = amp[torch.isfinite(amp)]
        nonzero = finite[finite > 0]
        max_amp = num(finite.max()) if finite.numel() else None
        min_amp = num(nonzero.min()) if nonzero.numel() else None
    return CurveSummary(
        loss=curve.loss,
        variant=curve.variant.label,
        advantage=curve.advantage,
        weight=curve.weight,
        rules=[name for name, mask in curve.regions.items() if bool(mask.any())],
        rules_enabled=list(curve.regions),
        zero=zero_runs(grid, curve),
        zero_share=float(curve.zero.sum()) / size,
        switched_off_share=float((curve.zero & curve.fired).sum()) / size,
        amplified=amplified_runs,
        amplified_share=amplified_share,
        damped=damped_runs,
        min_grad=num(magnitude.min()),
        max_grad=num(magnitude[at]) if has_max else None,
        max_at_pi_old=float(grid.pi_old[at]) if has_max else None,
        max_at_pi_theta=float(grid.pi_theta[at]) if has_max else None,
        max_amplification=max_amp,
        min_amplification=min_amp,
        non_finite=int((~torch.isfinite(curve.grad_sampled)).sum()),
        check_max_rel_err=None if check is None else num(check.rel_err.max()),
    )
