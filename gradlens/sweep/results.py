"""Typed results of a sweep: the per-point record of the data formats, and the summary report.

`SweepPoint` defines (and documents) one row of ``--format json|jsonl|csv``: flat, scalar
fields only, so pandas loads any of the three without post-processing. Rows are built column
by column from the curve tensors for speed (a 2-D grid has hundreds of thousands) — see
`gradlens.sweep.records` — and the tests validate them against this model. Non-finite numbers
are null.

The `SweepReport` is what the table and the plot read, and what ``--format summary`` writes
as one JSON document (schema ``gradlens.sweep/2``; ``gradlens schema --report sweep`` prints
its JSON Schema, generated from these models).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from gradlens.results import Result

SCHEMA_VERSION: Literal["gradlens.sweep/2"] = "gradlens.sweep/2"


class SweepPoint(Result):
    """One loss, one variant, one sign of A, at one point of the grid.

    Besides these fields a row has one column per ``over`` key (e.g. ``loss.eps_high``),
    right after ``variant``, holding that variant's value.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    loss: str = Field(description="registered loss name")
    variant: str = Field(description="the over combination, e.g. 'loss.eps_high=0.2'; 'default'")
    advantage: float = Field(description="A, with its sign")
    pi_old: float = Field(description="π_old(y), the behaviour policy's probability of y")
    pi_theta: float = Field(description="π_θ(y), the current policy's probability of y")
    ratio: float | None = Field(
        description="the ratio the loss saw, exp(ℓ − ℓ_old): π_θ(y)/π_old(y), × S_old with a "
        "renormalised stored ℓ_old, × S_old/S_θ on a replayed kept set (docs/sweep.md)"
    )
    weight: float = Field(description="aggregation weight a of a lone token")
    coefficient: float | None = Field(description="c = a·g = ∂L/∂log π_θ(y)")
    grad_sampled: float | None = Field(
        description="∂L/∂z_y = c·(1 − π_θ(y)), signed; c·(1 − π_θ(y)/S_θ) on a replayed kept set"
    )
    grad_other_mass: float | None = Field(
        description="Σ_{j≠y} |∂L/∂z_j| = |c|·(1 − π_θ(y)) (π_θ(y)/S_θ when replayed)"
    )
    amplification: float | None = Field(
        description="|g|/|A|: the sampled-row gradient over REINFORCE's; null if A is unused"
    )
    zero_grad: bool = Field(description="∂L/∂z_y is exactly 0")
    clipped: bool = Field(description="a rule of the loss (clip or mask) fired at this point")
    rule: str = Field(description="the rules that fired, joined by '+'; 'none' if none did")
    checked: bool = Field(description="this point was checked against autograd")
    check_rel_err: float | None = Field(description="autograd vs closed form; null if unchecked")


class Interval(Result):
    """A run of consecutive grid points: the first and last swept values in it.

    Both ends are grid points inside the run; the true edge lies between an end and the grid
    point beyond it.
    """

    low: float = Field(description="the smallest swept value in the run (a grid point)")
    high: float = Field(description="the largest swept value in the run (a grid point)")


class ZeroRun(Interval):
    """A run of points where ∂L/∂z_y = 0, and why."""

    cause: str = Field(
        description="the rules that fired ('clip_upper', ...), 'π_θ = 1' (1 − π_θ = 0), or 'g = 0'"
    )


class CurveSummary(Result):
    """Where one curve is zero, where it is amplified or damped, and its maximum.

    The runs (``zero``, ``amplified``, ``damped``) are given for 1-D sweeps, in the swept
    variable; on a 2-D grid they are null and the shares say how much of the grid is affected.
    ``amplified`` and ``damped`` are also null for a loss that ignores A (sft).
    """

    loss: str = Field(description="registered loss name")
    variant: str = Field(description="the over combination, e.g. 'loss.eps_high=0.2'; 'default'")
    advantage: float = Field(description="A, with its sign")
    weight: float = Field(description="aggregation weight a of a lone token")
    rules: list[str] = Field(description="rules of the loss that fired somewhere")
    rules_enabled: list[str] = Field(description="rules the loss applied with these settings")
    zero: list[ZeroRun] | None = Field(
        description="runs of the swept variable where ∂L/∂z_y = 0; [] if none; null on a 2-D grid"
    )
    zero_share: float = Field(description="share of the grid where ∂L/∂z_y = 0")
    switched_off_share: float = Field(description="share of the grid where a rule zeroed it")
    amplified: list[Interval] | None = Field(
        description="runs where the gradient is more than `amplified_above` × REINFORCE's; "
        "null on a 2-D grid or for a loss that ignores A"
    )
    amplified_share: float | None = Field(
        description="share of the grid so amplified; null for a loss that ignores A"
    )
    damped: list[Interval] | None = Field(
        description="runs where it is non-zero but below 1/`amplified_above` of REINFORCE's; "
        "null on a 2-D grid or for a loss that ignores A"
    )
    min_amplification: float | None = Field(description="min non-zero |g|/|A| over the grid")
    min_grad: float | None = Field(description="min |∂L/∂z_y| over the grid")
    max_grad: float | None = Field(description="max finite |∂L/∂z_y| over the grid")
    max_at_pi_old: float | None = Field(description="π_old(y) at max_grad")
    max_at_pi_theta: float | None = Field(description="π_θ(y) at max_grad")
    max_amplification: float | None = Field(description="max finite |g|/|A| over the grid")
    non_finite: int = Field(
        description="grid points where ∂L/∂z_y is not finite (overflow); the maxima skip them"
    )
    check_max_rel_err: float | None = Field(
        description="max autograd error at the checked points; null if unchecked or not finite"
    )


class AxisInfo(Result):
    """One swept axis of the grid."""

    name: Literal["pi_old", "pi_theta"]
    symbol: str = Field(description="how the table writes it: π_old or π_θ")
    min: float = Field(description="the first grid value")
    max: float = Field(description="the last grid value")
    points: int = Field(description="grid values on this axis, ends included")
    scale: Literal["log", "linear"] = Field(description="spacing of the values")


class LossInfo(Result):
    name: str
    per_token_grad_formula: str = Field(description="g = ∂(per-token loss)/∂log π_θ(y)")
    post_formula: str = Field(description="|∂L/∂z_y| of one token, before the weight a")
    rules: list[str] = Field(description="the rules (clip, mask) the loss can apply")
    rule_words: dict[str, str] = Field(
        default_factory=dict,
        description="what a rule of this loss means where it differs from the shared words "
        "(DPPO's clip_upper: a probability difference, not a ratio)",
    )


class CheckSummary(Result):
    """Closed form vs torch.autograd at a regular subset of the points."""

    vocab_size: int
    per_axis: int = Field(description="evenly spaced points per swept axis, ends included")
    points: int = Field(description="checked points per curve")
    checked_x: list[float] = Field(description="values of the x axis that were checked")
    curves: int
    max_rel_err: float | None = Field(
        description="max relative error over every checked point; null if none was checked "
        "or an error is not finite (which fails the check)"
    )
    worst: str | None = Field(description="the curve and point of max_rel_err")
    tolerance: float
    passed: bool = Field(description="max_rel_err ≤ tolerance (true when nothing was checked)")


class SweepReport(Result):
    """``gradlens sweep --format summary``: the summary of every curve, without the points."""

    schema_version: Literal["gradlens.sweep/2"] = SCHEMA_VERSION
    config: dict[str, Any] = Field(description="the resolved sweep configuration")
    vary: Literal["pi_old", "pi_theta", "both"]
    axes: list[AxisInfo] = Field(description="the swept axes: one, or two for vary = both")
    fixed: dict[str, float] = Field(description="the values of the axes that are not swept")
    advantage: float = Field(description="|A|")
    losses: list[LossInfo]
    variants: list[str] = Field(description="the over combinations; ['default'] without over")
    amplified_above: float = Field(description="the 'amplified' threshold, × REINFORCE")
    summaries: list[CurveSummary] = Field(
        description="one per curve: by loss (as named), then variant, then A > 0 before A < 0"
    )
    check: CheckSummary
    passed: bool = Field(description="the autograd check passed (what --check exits on)")
