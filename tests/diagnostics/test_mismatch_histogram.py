"""The figure's threshold lines in log ρ, and its histogram's bins (by hand)."""

from __future__ import annotations

import math

import torch

from gradlens.diagnostics.mismatch_histogram import k3_roots, mismatch_histogram, threshold_lines
from gradlens.losses.base import Correction


def test_k3_roots_solve_the_equation() -> None:
    # k3(x) = e^x − 1 − x = 0.005: ½x² ≈ 0.005 gives ±0.1; the cubic term x³/6 pulls the
    # positive root below 0.1 and pushes the negative one beyond −0.1
    lo, hi = k3_roots(0.005)
    for x in (lo, hi):
        assert abs(math.exp(x) - 1 - x - 0.005) < 1e-15
    assert -0.11 < lo < -0.1 < 0.09 < hi < 0.1


def test_lines_of_the_token_level_corrections_only() -> None:
    lines = threshold_lines(
        (
            Correction("token_tis", None, 2.0),
            Correction("icepop", 0.5, 5.0),
            Correction("seq_mis", None, 3.0),  # a sequence's ratio: no line on a token axis
        ),
        (0.9, 1.1),
    )
    got = [(t.correction, round(t.log_rho, 12)) for t in lines]
    assert got == [
        ("band [0.9, 1.1]", round(math.log(0.9), 12)),
        ("band [0.9, 1.1]", round(math.log(1.1), 12)),
        ("token_tis≤2", round(math.log(2), 12)),
        ("icepop[0.5,5]", round(math.log(0.5), 12)),
        ("icepop[0.5,5]", round(math.log(5), 12)),
    ]


def test_histogram_bins() -> None:
    # two tokens: π_old = 0.5 (log10 = −0.301, in [−0.5, −0.25): bin 30 of 32), Δ = 0.2;
    # π_old = 1e-9 (below the axis: the first bin), Δ = −0.2. R = max|Δ| = 0.2 > ln 1.2 = 0.182,
    # so y runs over [−0.2, 0.2] in 41 bins: Δ = −0.2 is bin 0, Δ = 0.2 the last (40)
    old = torch.tensor([[math.log(0.5), math.log(1e-9)]], dtype=torch.float64)
    rollout = old - torch.tensor([[0.2, -0.2]], dtype=torch.float64)
    h = mismatch_histogram(old, rollout, torch.ones(1, 2, dtype=torch.bool))
    assert h is not None
    assert math.isclose(h.y_edges[-1], 0.2) and math.isclose(h.y_edges[0], -0.2)
    assert h.counts[40][30] == 1 and h.counts[0][0] == 1
    assert sum(map(sum, h.counts)) == 2
