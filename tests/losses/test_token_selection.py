"""The top-entropy token selection (``loss.top_entropy_quantile``; docs/losses.md §2.28): only the
tokens at or above the batch's entropy quantile keep their policy gradient and entropy bonus.
Hand-computed TC29 from its literal config, and closed form vs autograd for every registered
loss × every aggregation with the selection and the bonus on.

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import math

import pytest
from helpers import (
    ABS,
    SIX,
    assert_agrees_with_autograd,
    cli_report,
    coefficients,
    loss_json,
    three_policy_batch,
    token_grad,
)

from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, loss_names


def test_tc29_top_entropy_selection_masks_policy_and_bonus() -> None:
    report = cli_report("literal_tc29_top_entropy.yaml")
    r = loss_json(report, "reinforce")
    assert coefficients(report, "reinforce") == pytest.approx([0.0, -1.0], abs=ABS)
    assert token_grad(report, "reinforce", 0) == pytest.approx(
        [0.0] * 5, abs=ABS
    )  # no bonus either
    assert token_grad(report, "reinforce", 1) == pytest.approx(
        [-0.180036, 0.144727, 0.065393, 0.003049, -0.033133], abs=SIX
    )
    assert r["loss"] == pytest.approx(-math.log(0.5) - 1.333074, abs=SIX)  # −0.639927
    assert r["clipping"]["shares"]["entropy_masked"] == 0.5
    # ρ = 1 (off): both tokens train, and both get the bonus
    off = cli_report("literal_tc29_top_entropy.yaml", "loss.top_entropy_quantile=1")
    assert coefficients(off, "reinforce") == pytest.approx([-1.0, -1.0], abs=ABS)
    assert "entropy_masked" not in loss_json(off, "reinforce")["clipping"]["shares"]


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("name", loss_names())
def test_top_entropy_selection_agrees_with_autograd_for_every_loss(name: str, mode: str):
    assert_agrees_with_autograd(
        three_policy_batch(6),
        name,
        LossParams(top_entropy_quantile=0.4, entropy_coef=0.1),
        Aggregation(mode, 5.0),
    )
