"""Spikes in a training run's series (grad_norm, an lm_head norm): a step far above its past.

Two rules, both causal (step s is judged by the steps before it only, so a spike does not hide
itself by raising its own baseline) and both robust (a median, never a mean: one earlier spike
does not lift the baseline for the steps after it):

- the hooks' rule, cheap enough for every training step: x_s > k · median(x_{s−w} … x_{s−1})
  with ``k`` = ``spike_factor`` (3 by default): "three times the usual gradient norm";
- `gradlens trace`'s rule, which also knows how much the series normally moves: with
  m = median and MAD = median(|x − m|) of the previous ``window`` values,

      z_s = (x_s − m) / max(1.4826 · MAD, floor · |m|)      a spike when z_s > threshold

  1.4826·MAD estimates σ for normal noise, so z is a robust z-score; the floor (1 % of the
  median by default) keeps a perfectly flat history (MAD = 0) from turning every wiggle into a
  spike. Only upward excursions count: a gradient norm that collapses is not a spike; one that
  is not finite (NaN, inf) is always one.

Neither rule judges a step with fewer than ``min_history`` earlier values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MAD_TO_SIGMA = 1.4826  # 1/Φ⁻¹(3/4): MAD · this = σ for normally distributed noise


@dataclass(frozen=True)
class SpikeScore:
    """One step judged against the ``window`` finite values before it."""

    index: int  # position in the series
    value: float
    median: float | None  # None: too little history to judge
    scale: float | None  # the robust σ the z-score divides by
    z: float | None
    spike: bool


def ratio_spike(value: float, history: Sequence[float], factor: float, min_history: int) -> bool:
    """The hooks' rule: ``value`` > ``factor`` × median(history) (history: the earlier steps)."""
    past = [x for x in history if math.isfinite(x)]
    if len(past) < min_history or not math.isfinite(value):
        return False
    return value > factor * statistics.median(past)


def mad_scores(
    values: Sequence[float | None],
    window: int = 20,
    threshold: float = 5.0,
    min_history: int = 3,
    floor: float = 0.01,
) -> list[SpikeScore]:
    """Every value of a series judged by the running median and MAD of its previous ``window``
    finite values. A non-finite value (NaN, inf: the run diverged, or the step overflowed) is a
    spike whatever the history, with no z-score; None (no value at that step) is none. Neither
    enters the history."""
    out: list[SpikeScore] = []
    past: list[float] = []
    for i, raw in enumerate(values):
        value = math.nan if raw is None else float(raw)
        if not math.isfinite(value):
            median = statistics.median(past[-window:]) if past else None
            out.append(SpikeScore(i, value, median, None, None, raw is not None))
        elif len(past) < min_history:
            out.append(SpikeScore(i, value, None, None, None, False))
        else:
            recent = past[-window:]
            median = statistics.median(recent)
            mad = statistics.median(abs(x - median) for x in recent)
            scale = max(MAD_TO_SIGMA * mad, floor * abs(median))
            z = (value - median) / scale if scale > 0 else (math.inf if value > median else 0.0)
            out.append(SpikeScore(i, value, median, scale, z, z > threshold))
        if math.isfinite(value):
            past.append(value)
    return out
