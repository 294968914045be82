"""A terminal plot in one line of text: magnitudes on a log scale as block characters.

Eight block heights span log10(low) … log10(high), a range shared by every line of a table so
heights can be compared across losses. An exact zero is drawn as '·' (a clipped or masked
token is the point of many sweeps, and a log scale has no place for it); a non-finite value
as '!'. Lines longer than ``width`` are sampled at evenly spaced points, both ends included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
ZERO = "·"
NON_FINITE = "!"


def log_range(lines: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """(smallest, largest) finite positive value over all lines; None if there is none."""
    positive = [v for line in lines for v in line if math.isfinite(v) and v > 0]
    return (min(positive), max(positive)) if positive else None


def sample(values: Sequence[float], width: int) -> list[float]:
    n = len(values)
    if n <= width:
        return list(values)
    return [values[round(i * (n - 1) / (width - 1))] for i in range(width)]


def sparkline(values: Sequence[float], width: int, bounds: tuple[float, float] | None) -> str:
    """``values`` (magnitudes ≥ 0) as at most ``width`` characters on the log scale ``bounds``."""
    if bounds is None:
        low = high = 1.0
    else:
        low, high = bounds
    span = math.log10(high) - math.log10(low)
    chars = []
    for v in sample(values, width):
        if not math.isfinite(v):
            chars.append(NON_FINITE)
        elif v <= 0:
            chars.append(ZERO)
        elif span == 0:
            chars.append(BLOCKS[len(BLOCKS) // 2])
        else:
            level = (math.log10(v) - math.log10(low)) / span * (len(BLOCKS) - 1)
            chars.append(BLOCKS[min(max(round(level), 0), len(BLOCKS) - 1)])
    return "".join(chars)
