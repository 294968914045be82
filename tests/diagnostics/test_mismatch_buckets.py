"""The gap by π_old bucket and by quarter of the completion, on a hand-computed batch."""

from __future__ import annotations

import math

import torch

from gradlens.diagnostics.mismatch_buckets import by_position, by_probability

F64 = torch.float64
BAND = (0.9, 1.1)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq 0 (4 tokens): π_old = [5e-5, 0.05, 0.6, 0.95], Δ = [ln 2, 0, 0, −0.05];
    seq 1 (2 tokens, then padding): π_old = [0.3, 0.3], Δ = [0, 0]."""
    old = torch.tensor([[5e-5, 0.05, 0.6, 0.95], [0.3, 0.3, 0.5, 0.5]], dtype=F64).log()
    delta = torch.tensor([[math.log(2), 0.0, 0.0, -0.05], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    return old, old - delta, mask


def test_by_probability() -> None:
    old, rollout, mask = batch()
    buckets = by_probability(old, rollout, mask, BAND)
    assert [b.label for b in buckets] == [
        "<0.0001",
        "0.0001–0.001",
        "0.001–0.01",
        "0.01–0.1",
        "0.1–0.5",
        "0.5–0.9",
        "≥0.9",
    ]
    assert [b.count for b in buckets] == [1, 0, 0, 1, 2, 1, 1]
    # k3 = ρ − 1 − Δ: ln 2 → 2 − 1 − ln 2 = 0.306853; −0.05 → e^−0.05 − 1 + 0.05 = 0.001229
    k3_tail = 1 - math.log(2)
    k3_top = math.exp(-0.05) - 1 + 0.05
    tail, top = buckets[0], buckets[-1]
    assert math.isclose(tail.k3_share, k3_tail / (k3_tail + k3_top), rel_tol=1e-12)
    assert math.isclose(top.k3_share, k3_top / (k3_tail + k3_top), rel_tol=1e-12)
    assert buckets[4].k3_share == 0.0  # the two tokens of seq 1 at π = 0.3, Δ = 0
    # ρ = 2 is outside [0.9, 1.1], ρ = e^−0.05 = 0.951 inside
    assert tail.outside_band == 1.0 and top.outside_band == 0.0
    assert math.isclose(tail.abs_diff_mean, math.log(2), rel_tol=1e-12)
    assert buckets[1].abs_diff_mean is None and buckets[1].k3_share is None


def test_by_position() -> None:
    old, rollout, mask = batch()
    quarters = by_position(old, rollout, mask, BAND)
    assert [q.label for q in quarters] == ["0–25%", "25–50%", "50–75%", "75–100%"]
    # seq 0 (L = 4): p = 0..3 → quarters 0..3; seq 1 (L = 2): ⌊4·0/2⌋ = 0, ⌊4·1/2⌋ = 2
    assert [q.count for q in quarters] == [2, 1, 2, 1]
    assert math.isclose(quarters[0].abs_diff_mean, math.log(2) / 2, rel_tol=1e-12)
    assert math.isclose(quarters[3].abs_diff_mean, 0.05, rel_tol=1e-12)
    assert math.isclose(sum(q.k3_share or 0.0 for q in quarters), 1.0, rel_tol=1e-12)
