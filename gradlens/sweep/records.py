"""The curves as flat records: one row per (loss, variant, sign of A, point).

The fields are those of `SweepPoint`, with one column per ``over`` key inserted after
``variant``. Rows are plain dicts built column by column from the tensors (``tolist`` once per
column), which keeps a 2-D grid of a million rows at a few seconds; non-finite numbers are None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import repeat
from typing import Any

from torch import Tensor

from gradlens.sweep.check import CurveCheck
from gradlens.sweep.config import Variant
from gradlens.sweep.curves import Curve
from gradlens.sweep.grid import Grid
from gradlens.sweep.results import SweepPoint

BASE_COLUMNS = list(SweepPoint.model_fields)
NO_RULE = "none"


def over_column(key: str) -> str:
    """The column of an ``over`` key: the key itself, unless a base field has that name."""
    return f"over.{key}" if key in BASE_COLUMNS else key


def columns(variants: list[Variant]) -> list[str]:
    """The header: the `SweepPoint` fields, with the ``over`` keys after ``variant``."""
    over = [over_column(key) for key in variants[0].settings] if variants else []
    cut = BASE_COLUMNS.index("variant") + 1
    return [*BASE_COLUMNS[:cut], *over, *BASE_COLUMNS[cut:]]


def _floats(values: Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.double().tolist()]


def _rules(curve: Curve, size: int) -> list[str]:
    names: list[list[str]] = [[] for _ in range(size)]
    for name, mask in curve.regions.items():
        for i in mask.nonzero().flatten().tolist():
            names[i].append(name)
    return ["+".join(n) if n else NO_RULE for n in names]


def point_rows(
    grid: Grid, curves: list[Curve], checks: list[CurveCheck]
) -> Iterator[dict[str, Any]]:
    """Every row, curve after curve (in `sweep_curves` order), points in grid order."""
    by_curve = {id(check.curve): check for check in checks}
    size = grid.size
    pi_old, pi_theta = grid.pi_old.tolist(), grid.pi_theta.tolist()
    for curve in curves:
        checked = [False] * size
        rel_err: list[float | None] = [None] * size
        check = by_curve.get(id(curve))
        if check is not None:
            for i, err in zip(check.indices.tolist(), _floats(check.rel_err), strict=True):
                checked[i], rel_err[i] = True, err
        values: dict[str, Any] = {
            "loss": repeat(curve.loss),
            "variant": repeat(curve.variant.label),
            **{over_column(k): repeat(v) for k, v in curve.variant.settings.items()},
            "advantage": repeat(curve.advantage),
            "pi_old": pi_old,
            "pi_theta": pi_theta,
            "ratio": _floats(curve.ratio),
            "weight": repeat(curve.weight),
            "coefficient": _floats(curve.coefficient),
            "grad_sampled": _floats(curve.grad_sampled),
            "grad_other_mass": _floats(curve.grad_other_mass),
            "amplification": _floats(curve.amplification),
            "zero_grad": curve.zero.tolist(),
            "clipped": curve.fired.tolist(),
            "rule": _rules(curve, size),
            "checked": checked,
            "check_rel_err": rel_err,
        }
        header = list(values)
        for row in zip(*values.values(), strict=False):  # repeat() columns are endless
            yield dict(zip(header, row, strict=True))
