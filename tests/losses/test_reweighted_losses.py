"""The losses that reweight the policy gradient of a token or a sequence: TOPR's tapered
off-policy REINFORCE (§2.20), DRO's quadratic log-ratio penalty (§2.21), LUSPO's length-unbiased
GSPO (§2.22), VESPO's gamma-shaped sequence weight (§2.23) and FIPO's future-KL credit (§2.25)
(docs/losses.md).

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ABS,
    SIX,
    TOL_F64,
    cli_report,
    coefficients,
    loss_json,
    rel_err,
    scaled,
    three_policy_batch,
    token_grad,
)

from gradlens.grads import closed_form, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss


def test_tc21_topr() -> None:
    report = cli_report("literal_tc21_topr.yaml")
    # A>0: −A (no IS); A≤0: −A·min(r, 1): r = 2 → 1, r = 0.625 → 0.625
    assert coefficients(report, "topr") == pytest.approx([-1.0, 1.0, 0.625], abs=ABS)
    assert token_grad(report, "topr", 2) == pytest.approx(scaled(0.625), abs=ABS)
    assert loss_json(report, "topr")["loss"] == pytest.approx(0.625 * math.log(0.5), abs=ABS)
    assert loss_json(report, "topr")["clipping"]["shares"]["ratio_truncated"] == pytest.approx(
        1 / 3
    )


def test_tc22_dro() -> None:
    report = cli_report("literal_tc22_dro.yaml")
    # g = −A + 0.1·ln(0.5/π_old): −1 + 0.069315, 0 + 0.069315, −1
    assert coefficients(report, "dro") == pytest.approx([-0.930685, 0.069315, -1.0], abs=SIX)
    assert token_grad(report, "dro", 0) == pytest.approx(
        [-0.465343, 0.186137, 0.139603, 0.093069, 0.046534], abs=SIX
    )
    assert loss_json(report, "dro")["loss"] == pytest.approx(1.434340, abs=SIX)


def test_tc23_luspo_is_length_unbiased() -> None:
    report = cli_report("literal_tc23_luspo.yaml")
    # s₁ = 1.25^(1/3) = 1.077217; gspo c = a·(−s) = [−1/2, −1.077217/6 ×3];
    # luspo c = a·(−|y|·s) = [−1/2, −3·1.077217/6 = −0.538609 ×3]
    assert coefficients(report, "gspo") == pytest.approx([-0.5] + [-0.179536] * 3, abs=SIX)
    assert coefficients(report, "luspo") == pytest.approx([-0.5] + [-0.538609] * 3, abs=SIX)
    assert token_grad(report, "luspo", 1) == pytest.approx(
        [-0.269304, 0.107722, 0.080791, 0.053861, 0.026930], abs=SIX
    )


def test_tc24_vespo_sequence_product_weight() -> None:
    report = cli_report("literal_tc24_vespo.yaml")
    # φ(1) = 1, φ₊(2) = 4e^{−3}, φ₋(2) = 8e^{−2}, φ₊(2/3) = (4/9)e, φ(2·0.5) = 1, ρ folded: 4e^{−3}
    phi_pos, phi_neg, top = 4 * math.exp(-3), 8 * math.exp(-2), 4 / 9 * math.e
    expected = [-1.0, -phi_pos, phi_neg, -top, -1.0, -1.0, -phi_pos]
    assert coefficients(report, "vespo") == pytest.approx(expected, abs=ABS)
    assert [round(abs(c), 6) for c in expected[1:4]] == [0.199148, 1.082682, 1.208125]
    assert token_grad(report, "vespo", 2) == pytest.approx(
        [0.541341, -0.216536, -0.162402, -0.108268, -0.054134], abs=SIX
    )
    assert loss_json(report, "vespo")["metrics"]["vespo_phi"] == pytest.approx(5.689103, abs=1e-5)


def test_tc26_fipo_future_kl_weight() -> None:
    report = cli_report("literal_tc26_fipo.yaml")
    gamma = 2 ** (-1 / 32)
    d = math.log(0.5 / 0.45)
    # seq 0: f = [e^{γ·d}, e^{d}, 1] = [1.108605, 1.111111, 1], g = −f·r, r = [1, 1/0.9, 1];
    # seq 1: e^F < 1 → f = 1; seq 2: safety (A<0, r = 5 > 4): f = 1, g = 5
    expected = [-math.exp(gamma * d), -math.exp(d) * 0.5 / 0.45, -1.0, -1.0, -0.5 / 0.6, 5.0]
    assert coefficients(report, "fipo") == pytest.approx(expected, abs=ABS)
    assert [round(c, 6) for c in expected[:2]] == [-1.108605, -1.234568]
    assert token_grad(report, "fipo", 1) == pytest.approx(
        [-0.617284, 0.246914, 0.185185, 0.123457, 0.061728], abs=SIX
    )
    assert coefficients(report, "ppo_clip") == pytest.approx(
        [-1.0, -0.5 / 0.45, -1.0, -1.0, -0.5 / 0.6, 5.0], abs=ABS
    )
    # without the safety clamp the A<0 token's weight is clip(5, 1, 1.2) = 1.2: g = 6
    off = cli_report("literal_tc26_fipo.yaml", "loss.fipo_safety_threshold=null")
    assert coefficients(off, "fipo")[5] == pytest.approx(6.0, abs=ABS)


def test_fipo_weight_is_between_its_clip_bounds() -> None:
    batch = three_policy_batch(5)
    view = softmax_view(batch)
    for params, low, high in (
        (LossParams(), 1.0, 1.2),
        (
            LossParams(
                fipo_clip_range=0.5,
                fipo_clip_high_only=False,
                fipo_safety_threshold=1.5,
                fipo_decay_rate=2.0,
                dual_clip=2.5,
            ),
            0.5,
            1.5,
        ),
    ):
        g = closed_form(batch, view, get_loss("fipo"), params, Aggregation())
        base = closed_form(batch, view, get_loss("ppo_clip"), params, Aggregation())
        w = g.terms.token_metrics["fipo_weight"][batch.mask]
        assert float(w.min()) >= low - 1e-15 and float(w.max()) <= high + 1e-15
        assert float(w.min()) < float(w.max())  # not constant: the future KL varies
        ratio = g.coefficient[batch.mask] / torch.where(
            base.coefficient[batch.mask] == 0, 1.0, base.coefficient[batch.mask]
        )
        kept = base.coefficient[batch.mask] != 0
        assert rel_err(ratio[kept], w[kept]) <= TOL_F64  # g = f·g_ppo_clip
