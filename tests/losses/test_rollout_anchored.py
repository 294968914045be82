"""The losses whose weight is anchored on the rollout policy μ (``rollout_is``,
``cispo_rollout``; docs/losses.md §2.26), and the finding when corrections stack on them.

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
    loss_json,
    scaled,
    token_grad,
)


def test_tc27_weights_anchored_on_the_rollout() -> None:
    report = cli_report("literal_tc27_rollout_anchored.yaml")
    # r_μ = [1.111111, 2, 0.714286]
    assert coefficients(report, "rollout_is") == pytest.approx([-0.5 / 0.45, 0.0, 0.0], abs=ABS)
    assert coefficients(report, "cispo_rollout") == pytest.approx(
        [-0.5 / 0.45, -1.28, 0.5 / 0.7], abs=ABS
    )
    assert coefficients(report, "cispo") == pytest.approx([-1.0, -1.0, 1.0], abs=ABS)
    assert token_grad(report, "cispo_rollout", 1) == pytest.approx(scaled(-1.28), abs=ABS)
    assert loss_json(report, "rollout_is")["clipping"]["shares"]["is_masked"] == pytest.approx(
        2 / 3
    )
    assert loss_json(report, "cispo_rollout")["clipping"]["shares"]["weight_clipped"] == (
        pytest.approx(1 / 3)
    )


def test_rollout_anchored_losses_warn_about_stacked_corrections() -> None:
    report = cli_report(
        "literal_tc27_rollout_anchored.yaml", "loss.corrections=[{kind: token_tis}]"
    )
    for name in ("rollout_is", "cispo_rollout"):
        assert any(
            "counts the training–inference ratio twice" in f
            for f in loss_json(report, name)["findings"]
        )
    assert not any("twice" in f for f in loss_json(report, "cispo")["findings"])
