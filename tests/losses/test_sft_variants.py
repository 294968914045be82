"""SFT reweighted by the target's probability: DFT and CHORD's φ term (``dft``, ``chord``;
docs/losses.md §2.27), beside plain ``sft``.

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import pytest
from helpers import (
    ABS,
    cli_report,
    coefficients,
    token_grad,
)


def test_tc28_sft_variants() -> None:
    report = cli_report("literal_tc28_sft_variants.yaml")
    assert coefficients(report, "sft") == pytest.approx([-1.0, -1.0], abs=ABS)
    assert coefficients(report, "dft") == pytest.approx([-0.5, -0.05], abs=ABS)
    assert coefficients(report, "chord") == pytest.approx([-0.25, -0.0475], abs=ABS)
    assert token_grad(report, "dft", 0) == pytest.approx([-0.25, 0.1, 0.075, 0.05, 0.025], abs=ABS)
    assert token_grad(report, "chord", 0) == pytest.approx(
        [-0.125, 0.05, 0.0375, 0.025, 0.0125], abs=ABS
    )
    assert token_grad(report, "dft", 1) == pytest.approx([0.025, 0.01, 0.0075, 0.005, -0.0475])
    assert token_grad(report, "chord", 1) == pytest.approx(
        [0.02375, 0.0095, 0.007125, 0.00475, -0.045125], abs=ABS
    )
