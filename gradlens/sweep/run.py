"""``gradlens sweep`` as a pure function: a validated `SweepConfig` in, a `SweepOutcome` out.

config → variants (the ``over`` combinations) → grid → closed-form curves for every loss,
variant and sign of A → the autograd check of a regular subset → one summary per curve. No
I/O here: the CLI renders the report, writes the records and draws the plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gradlens.losses import get_loss
from gradlens.sweep.check import TOLERANCE, CurveCheck, check_curves
from gradlens.sweep.config import SweepConfig, Variant, expand_over
from gradlens.sweep.curves import SIGNS, Curve, Progress, sweep_curves
from gradlens.sweep.grid import SWEPT, SYMBOL, Grid, make_grid
from gradlens.sweep.records import columns, point_rows
from gradlens.sweep.results import AxisInfo, CheckSummary, LossInfo, SweepReport
from gradlens.sweep.summary import AMPLIFIED_ABOVE, summarize


@dataclass(frozen=True)
class SweepOutcome:
    """Everything a sweep computed: the tensors (for plots and records) and the report."""

    config: SweepConfig
    grid: Grid
    variants: list[Variant]
    curves: list[Curve]
    checks: list[CurveCheck]
    report: SweepReport

    @property
    def num_rows(self) -> int:
        return self.grid.size * len(self.curves)

    def columns(self) -> list[str]:
        return columns(self.variants)

    def rows(self) -> Iterator[dict[str, Any]]:
        return point_rows(self.grid, self.curves, self.checks)


def build_grid(config: SweepConfig) -> Grid:
    axes = {name: config.axis(name).spec() for name in ("pi_old", "pi_theta")}
    fixed = {name: config.axis(name).fixed for name in ("pi_old", "pi_theta")}
    return make_grid(config.vary, axes, fixed)


def work_units(config: SweepConfig) -> int:
    """Rows the sweep will produce (points × losses × variants × signs), before running it."""
    points = 1
    for name in SWEPT[config.vary]:
        points *= config.axis(name).points
    variants = 1
    for values in config.over.values():
        variants *= len(values)
    return points * len(config.losses) * variants * len(SIGNS)


def describe_point(grid: Grid, curve: Curve, index: int) -> str:
    return (
        f"{curve.loss} [{curve.variant.label}] A = {curve.advantage:+g} at "
        f"π_old = {float(grid.pi_old[index]):.4g}, π_θ = {float(grid.pi_theta[index]):.4g}"
    )


def check_summary(config: SweepConfig, grid: Grid, checks: list[CurveCheck]) -> CheckSummary:
    """The largest disagreement over every checked point, and where it is.

    A NaN error (one path non-finite) counts as the worst of all and fails the check.
    """
    indices = grid.pick(config.check.points)
    worst: tuple[float, Curve, int] | None = None
    for check in checks:
        k = int(check.rel_err.argmax())  # torch's argmax ranks NaN highest
        err = float(check.rel_err[k])
        if worst is None or math.isnan(err) or err > worst[0]:
            worst = (err, check.curve, int(check.indices[k]))
            if math.isnan(err):
                break
    max_err = None if worst is None else worst[0]
    return CheckSummary(
        vocab_size=config.check.vocab_size,
        per_axis=config.check.points,
        points=int(indices.numel()),
        checked_x=sorted(set(grid.x_at(indices).tolist())),
        curves=len(checks),
        max_rel_err=None if max_err is None or math.isnan(max_err) else max_err,
        worst=None if worst is None else describe_point(grid, worst[1], worst[2]),
        tolerance=TOLERANCE,
        passed=worst is None or (not math.isnan(worst[0]) and worst[0] <= TOLERANCE),
    )


def run_sweep(config: SweepConfig, progress: Progress | None = None) -> SweepOutcome:
    """Compute every curve of ``config``, check a subset against autograd, summarise."""
    variants = expand_over(config)
    grid = build_grid(config)
    curves = sweep_curves(grid, variants, config.losses, progress)
    checks = check_curves(grid, curves, config.check.points, config.check.vocab_size)
    by_curve = {id(c.curve): c for c in checks}
    summaries = [summarize(grid, curve, by_curve.get(id(curve))) for curve in curves]
    axes = [
        AxisInfo(
            name=axis.name,  # type: ignore[arg-type]
            symbol=SYMBOL[axis.name],
            min=float(axis.values[0]),
            max=float(axis.values[-1]),
            points=int(axis.values.numel()),
            scale=axis.scale,  # type: ignore[arg-type]
        )
        for axis in grid.axes
    ]
    losses = [
        LossInfo(
            name=s.name,
            per_token_grad_formula=s.grad_formula,
            post_formula=s.post_formula,
            rules=list(s.regions),
            rule_words=dict(s.rule_words),
        )
        for s in (get_loss(name) for name in config.losses)
    ]
    check = check_summary(config, grid, checks)
    report = SweepReport(
        config=config.model_dump(mode="json"),
        vary=config.vary,
        axes=axes,
        fixed=grid.fixed,
        advantage=config.advantage,
        losses=losses,
        variants=[v.label for v in variants],
        amplified_above=AMPLIFIED_ABOVE,
        summaries=summaries,
        check=check,
        passed=check.passed,
    )
    return SweepOutcome(config, grid, variants, curves, checks, report)
