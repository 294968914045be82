"""Tensor → report numbers: finite floats or None (rendered as '—' / JSON null)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num(x: Tensor | float) -> float | None:
    """A Python float, or None when the value is NaN or ±inf."""
    value = float(x)
    return value if math.isfinite(value) else None


def count_non_finite(*tensors: Tensor) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def rel_err(actual: Tensor, expected: Tensor) -> float | None:
    """Normwise relative difference max|a − b| / max|b| in float64; 0 when both are 0."""
    a, b = actual.double(), expected.double()
    return max_ratio(a - b, b)


def max_ratio(diff: Tensor, scale: Tensor) -> float | None:
    """max|diff| / max|scale| in float64; max|diff| when the scale is 0, and 0 when both are
    (or empty)."""
    d = float(diff.double().abs().max()) if diff.numel() else 0.0
    s = float(scale.double().abs().max()) if scale.numel() else 0.0
    if s == 0.0:
        return num(d) if d != 0.0 else 0.0
    return num(d / s)


def quantiles(x: Tensor, qs: tuple[float, ...]) -> list[float | None]:
    """Quantiles of the finite entries of ``x`` (None when there are none)."""
    finite = x[torch.isfinite(x)].double()
    if finite.numel() == 0:
        return [None] * len(qs)
    return [num(v) for v in torch.quantile(finite, torch.tensor(qs, dtype=torch.float64))]
