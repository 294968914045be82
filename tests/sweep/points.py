"""Curves at exactly the π_old values given: a 1-D grid built by hand (not the sweep's log
spacing), so a test can put a point where its arithmetic is done."""

from __future__ import annotations

import torch

from gradlens.sweep import SweepConfig
from gradlens.sweep.config import expand_over
from gradlens.sweep.curves import Curve, variant_curves
from gradlens.sweep.grid import Axis, Grid


def curves_on_points(
    config: SweepConfig, loss: str, pi_old: list[float], pi_theta: float
) -> dict[float, Curve]:
    """{+1.0: curve at A = +1, −1.0: curve at A = −1} of ``loss`` under ``config`` (one
    variant) at these π_old and the fixed π_θ."""
    values = torch.tensor(pi_old, dtype=torch.float64)
    grid = Grid(
        vary="pi_old",
        axes=(Axis("pi_old", "log", values),),
        fixed={"pi_theta": pi_theta},
        pi_old=values,
        pi_theta=torch.full_like(values, pi_theta),
        shape=(len(pi_old),),
    )
    (variant,) = expand_over(config)
    return {c.advantage: c for c in variant_curves(grid, variant, loss)}
