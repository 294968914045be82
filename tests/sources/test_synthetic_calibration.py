"""The chunked entropy calibration: the per-tile sums against a materialized softmax, the
safeguarded Newton iteration, and the memory budget changing no number."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.sources.synthetic_calibration import (
    ENTROPY_TOL,
    ROW_TILE,
    VOCAB_BLOCK,
    LogitTiles,
    calibrate,
    entropy_scale_chunked,
)

F64 = torch.float64
# 600 tokens and 5,000 vocabulary rows: 3 row tiles (256, 256, 88) × 3 blocks (2048, 2048, 904),
# so every combination over tiles and blocks, and the partial ones, is exercised.
M, V, H = 600, 5000, 8
assert M > 2 * ROW_TILE and V > 2 * VOCAB_BLOCK


def inputs(seed: int = 0, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=gen, dtype=F64)
    weight0 = torch.randn(V, H, generator=gen, dtype=F64)
    return hidden.to(dtype), weight0.to(dtype)


def reference(hidden: torch.Tensor, weight0: torch.Tensor, c: float) -> tuple[float, float]:
    """Mean entropy of softmax(c·h·W0ᵀ) over all [M, V] at once, and its derivative in log c
    (= −mean Var_π(c·z⁰), written out as Σ π (c z)² − (Σ π c z)²), in float64."""
    z = c * (hidden.double() @ weight0.double().T)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    mean = (p * z).sum(-1)
    variance = (p * z * z).sum(-1) - mean * mean
    return float(entropy.mean()), float(-variance.mean())


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.05, 0.5, 2.0, 20.0])
def test_tiles_give_the_materialized_entropy_and_slope(c: float) -> None:
    # Float64 tiles: the per-block sums and their combination against the running maximum
    # differ from one log_softmax over [M, V] only by rounding, ~1e-15 relative (1e-12 leaves
    # room for V = 5,000-term sums). c = 20 puts most of each row below the exp floor (−80):
    # those terms are below float64 resolution either way.
    hidden, weight0 = inputs()
    entropy, slope = LogitTiles(hidden, weight0, budget=0).entropy(c)
    want_entropy, want_slope = reference(hidden, weight0, c)
    assert entropy == pytest.approx(want_entropy, rel=1e-12, abs=1e-12)
    assert slope == pytest.approx(want_slope, rel=1e-10, abs=1e-12)


def test_tiles_in_float32_are_within_float32_rounding() -> None:
    # Float32 tiles, float64 combination: each term carries ~6e-8 relative rounding (z⁰, the
    # exp, 2048-term sums), so H̄ is within ~1e-6 of the float64 value (H̄ ≈ 2 here).
    hidden, weight0 = inputs(dtype=torch.float32)
    entropy, _ = LogitTiles(hidden, weight0, budget=0).entropy(0.5)
    want, _ = reference(hidden, weight0, 0.5)
    assert entropy == pytest.approx(want, abs=1e-5)
    assert abs(entropy - want) > 0  # float32 sums: not the float64 number (the test can fail)


@pytest.mark.slow
def test_the_budget_changes_no_number() -> None:
    # Kept tiles and recomputed ones are the same GEMM on the same operands: bit-identical.
    hidden, weight0 = inputs(dtype=torch.float32)
    none = LogitTiles(hidden, weight0, budget=0)
    some = LogitTiles(hidden, weight0, budget=3 * ROW_TILE * VOCAB_BLOCK * 4)
    every = LogitTiles(hidden, weight0, budget=1 << 40)
    for c in (0.3, 0.7, 0.7):  # the first sweep keeps tiles, the later ones read them
        values = {none.entropy(c), some.entropy(c), every.entropy(c)}
        assert len(values) == 1, values
    assert len(none.kept) == 0 and 3 <= len(some.kept) < 9 and len(every.kept) == 9
    assert some.kept_bytes <= some.budget


@pytest.mark.parametrize("start", [1e-4, 0.3, 1e4])
@pytest.mark.parametrize("target", [0.01, 1.0, 8.0])
def test_calibrate_finds_the_root_from_any_start(start: float, target: float) -> None:
    # H(c) = log(1 + K e^{−c}) + ...: a smooth function falling from log(1 + K) ≈ 9.2 at c = 0
    # towards 0, with its exact slope in log c. The iteration must bracket the root from a
    # start 4 decades off on either side and stop within the tolerance.
    k = 1e4

    def h(c: float) -> tuple[float, float]:
        value = math.log1p(k * math.exp(-c))
        slope = -c * k * math.exp(-c) / (1 + k * math.exp(-c))  # dH/d log c = c·dH/dc
        return value, slope

    c, evaluations = calibrate(h, target, start)
    assert abs(h(c)[0] - target) <= ENTROPY_TOL
    assert evaluations < 40


def test_calibrate_converges_with_a_useless_slope() -> None:
    # A slope of 0 (or of the wrong sign) disables Newton: the bracket expansion and the
    # geometric bisection alone must still end within the tolerance.
    def h(c: float) -> tuple[float, float]:
        return 5.0 / (1.0 + c), 0.0

    c, evaluations = calibrate(h, 1.0, 1e-3)
    assert abs(5.0 / (1.0 + c) - 1.0) <= ENTROPY_TOL  # the root is c = 4
    assert evaluations < 100


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.2, 0.5, 3.0])
def test_entropy_scale_hits_the_target(target: float) -> None:
    # The materialized float64 entropy at the returned c: within the calibration's tolerance
    # (its float64 evaluation is exact to ~1e-15, see the first test).
    hidden, weight0 = inputs(seed=1)
    c, sweeps, tiles = entropy_scale_chunked(hidden, weight0, target, budget=1 << 30)
    assert reference(hidden, weight0, c)[0] == pytest.approx(target, abs=ENTROPY_TOL)
    # The start on 64 tokens leaves the full iteration a handful of sweeps.
    assert sweeps <= 5
    assert len(tiles.kept) == 9
