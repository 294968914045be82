"""The points a sweep visits: one or two probability axes, log- or linearly spaced.

A sweep varies π_old(y) (the behaviour policy's probability of the sampled token), π_θ(y)
(the current policy's), or both. Each axis is a range inside (0, 1] — a probability of 0 has
no log-prob, and the ratio r = π_θ/π_old needs both to be positive — walked in ``points``
steps, evenly in log10 (the default: the interesting things happen over decades) or evenly.

The grid is flattened to P points. For a 2-D grid the layout is row-major with π_θ on the
rows and π_old on the columns, so ``values.reshape(shape)`` is an image whose x is π_old and
whose y is π_θ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.errors import GradlensError

AXES = ("pi_old", "pi_theta")
SCALES = ("log", "linear")
MAX_POINTS = 1_000_000  # points of a whole grid: beyond this the records alone run to gigabytes

# What each `vary` setting sweeps, in the order (columns, rows) for a 2-D grid.
SWEPT: dict[str, tuple[str, ...]] = {
    "pi_old": ("pi_old",),
    "pi_theta": ("pi_theta",),
    "both": ("pi_old", "pi_theta"),
}

SYMBOL = {"pi_old": "π_old", "pi_theta": "π_θ"}


def range_problems(low: float, high: float, points: int, scale: str) -> list[str]:
    """What is wrong with an axis range, in words (empty when it is usable).

    The bounds themselves (each in (0, 1]) and the point count (≥ 2) are checked by the
    config model's field constraints; this adds the rules that involve several fields.
    """
    problems = []
    if low > high:
        problems.append(f"the range is inverted: min ({low:g}) > max ({high:g})")
    elif low == high:
        problems.append(f"the range is empty: min = max = {low:g}; give min < max")
    if scale not in SCALES:
        problems.append(f"scale must be one of {', '.join(SCALES)} (got {scale!r})")
    if points < 2:
        problems.append(f"points must be at least 2 (got {points})")
    return problems


def axis_values(low: float, high: float, points: int, scale: str) -> Tensor:
    """[points] float64 values from ``low`` to ``high`` inclusive, evenly in log10 or linearly.

    The end points are set exactly to ``low`` and ``high`` (10**log10(x) need not round back
    to x), so a sweep to 1.0 really reaches on-policy-at-certainty π = 1.
    """
    problems = range_problems(low, high, points, scale)
    if problems or not (0 < low <= 1 and 0 < high <= 1):
        raise GradlensError("bad axis: " + "; ".join(problems or ["bounds must lie in (0, 1]"]))
    if scale == "log":
        values = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    else:
        values = torch.linspace(low, high, points, dtype=torch.float64)
    values[0], values[-1] = low, high
    return values


@dataclass(frozen=True)
class Axis:
    """One swept axis: its name (``pi_old`` or ``pi_theta``), scale and values [n]."""

    name: str
    scale: str
    values: Tensor

    @property
    def symbol(self) -> str:
        return SYMBOL[self.name]


@dataclass(frozen=True)
class Grid:
    """The P points of a sweep.

    Attributes:
        vary: ``pi_old``, ``pi_theta`` or ``both``.
        axes: the swept axes: one, or (π_old, π_θ) for a 2-D grid.
        fixed: the value of each axis that is not swept.
        pi_old: [P] π_old(y) at each point.
        pi_theta: [P] π_θ(y) at each point.
        shape: (P,) for a 1-D sweep; (n_θ, n_old) for a 2-D grid (rows = π_θ).
    """

    vary: str
    axes: tuple[Axis, ...]
    fixed: dict[str, float]
    pi_old: Tensor
    pi_theta: Tensor
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(self.pi_old.numel())

    @property
    def is_2d(self) -> bool:
        return len(self.axes) == 2

    @property
    def x(self) -> Axis:
        """The horizontal axis of a plot: the swept one, or π_old for a 2-D grid."""
        return self.axes[0]

    def x_at(self, flat: Tensor | int) -> Tensor:
        """The x value (the swept variable) at flat point index ``flat``."""
        return (self.pi_old if self.x.name == "pi_old" else self.pi_theta)[flat]

    def pick(self, per_axis: int) -> Tensor:
        """Flat indices of a regular subset: ``per_axis`` evenly spaced indices on each axis.

        Both ends of every axis are included; for a 2-D grid the subset is their product.
        """
        picks = [_even_indices(len(a.values), per_axis) for a in self.axes]
        if not self.is_2d:
            return picks[0]
        cols, rows = picks  # π_old on the columns, π_θ on the rows
        n_old = self.shape[1]
        return (rows[:, None] * n_old + cols[None, :]).reshape(-1)  # [k_θ · k_old]


def _even_indices(n: int, k: int) -> Tensor:
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, n - 1, min(k, n), dtype=torch.float64).round().long().unique()


def make_grid(
    vary: str, axes: dict[str, tuple[float, float, int, str]], fixed: dict[str, float]
) -> Grid:
    """The grid of ``vary`` from each axis's (min, max, points, scale) and fixed value."""
    if vary not in SWEPT:
        raise GradlensError(f"vary must be one of {', '.join(SWEPT)} (got {vary!r})")
    swept = tuple(Axis(name, axes[name][3], axis_values(*axes[name])) for name in SWEPT[vary])
    if len(swept) == 2:
        old, theta = swept[0].values, swept[1].values
        if old.numel() * theta.numel() > MAX_POINTS:
            raise GradlensError(
                f"the grid has {old.numel()} × {theta.numel()} points, more than {MAX_POINTS:,}; "
                "lower pi_old.points or pi_theta.points"
            )
        shape: tuple[int, ...] = (theta.numel(), old.numel())
        pi_theta, pi_old = torch.meshgrid(theta, old, indexing="ij")  # [n_θ, n_old] each
        pi_old, pi_theta = pi_old.reshape(-1), pi_theta.reshape(-1)  # [P]
    else:
        values = swept[0].values
        shape = (values.numel(),)
        other = torch.full_like(values, fixed["pi_theta" if vary == "pi_old" else "pi_old"])
        pi_old, pi_theta = (values, other) if vary == "pi_old" else (other, values)
    unswept = {name: value for name, value in fixed.items() if name not in SWEPT[vary]}
    return Grid(vary, swept, unswept, pi_old.contiguous(), pi_theta.contiguous(), shape)
