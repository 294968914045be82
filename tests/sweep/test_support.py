"""The sweep's kept set (``support`` and ``loss.sampling_support``, gradlens.sweep.support):
hand-computed points with and without replay, the autograd check of replayed points, the
settings' errors and the command line.

`curves_at` builds a 1-D grid whose π_old values are exactly the ones given, at a fixed π_θ,
and returns {sign of A: Curve}.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.errors import GradlensError
from gradlens.losses import loss_names
from gradlens.sweep import build_sweep_config, run_sweep
from gradlens.sweep.check import TOLERANCE, check_curve
from gradlens.sweep.curves import Curve
from tests.sweep.points import curves_on_points

runner = CliRunner()
# float64 evaluations of the same closed form (a division, a log and an exp apart): a few ulps
REL = 1e-12


def curves_at(
    loss: str, pi_old: list[float], pi_theta: float, sets: list[str]
) -> dict[float, Curve]:
    """{+1.0: curve at A = +1, −1.0: curve at A = −1} of ``loss`` at exactly these π_old."""
    config = build_sweep_config(
        flags={"losses": [loss], "pi_theta.fixed": pi_theta},
        sets=sets,
        axis={"max": max(pi_old)},
    )
    return curves_on_points(config, loss, pi_old, pi_theta)


KEPT = ["support.kept_mass=0.25", "support.old_logp=kept"]


def test_engine_renormalised_old_logp_without_replay_scales_the_ratio_by_the_kept_mass():
    # π_θ(y) = π_old(y) = 0.1, S_θ = S_old = 0.25, ℓ_old stored renormalised (old_logp kept):
    # ℓ_old = log(0.1/0.25) = log 0.4.
    # full: ℓ = log 0.1, r = 0.1/0.4 = 0.25 (= r·S_old, r = 1): on-policy, yet below 1 − ε_low.
    #   A = −1: r < 0.8 → clip_lower, c = 0, ∂L/∂z_y = 0.
    #   A = +1: not clipped (only r > 1.28 is), c = −A·r = −0.25,
    #           ∂L/∂z_y = −0.25·(1 − 0.1) = −0.225, other rows Σ = 0.225.
    full = curves_at("ppo_clip", [0.1], 0.1, [*KEPT, "loss.sampling_support=full"])
    assert float(full[-1.0].ratio[0]) == pytest.approx(0.25, rel=REL)
    assert full[-1.0].rules_at(0) == ["clip_lower"]
    assert float(full[-1.0].grad_sampled[0]) == 0.0
    assert float(full[1.0].coefficient[0]) == pytest.approx(-0.25, rel=REL)
    assert float(full[1.0].grad_sampled[0]) == pytest.approx(-0.225, rel=REL)
    assert float(full[1.0].grad_other_mass[0]) == pytest.approx(0.225, rel=REL)
    # kept: ℓ̃ = log(0.1/0.25) = log 0.4, ℓ̃_old = log 0.4 (already renormalised): r̃ = 1.
    #   π̃_θ(y) = 0.1/0.25 = 0.4, so ∂L/∂z_y = c·(1 − 0.4) = 0.6·c.
    #   A = −1: c = −A·r̃ = 1, ∂L/∂z_y = +0.6, no rule.   A = +1: c = −1, ∂L/∂z_y = −0.6.
    kept = curves_at("ppo_clip", [0.1], 0.1, [*KEPT, "loss.sampling_support=kept"])
    assert float(kept[-1.0].ratio[0]) == pytest.approx(1.0, rel=REL)
    assert float(kept[-1.0].pi_sampled[0]) == pytest.approx(0.4, rel=REL)
    assert kept[-1.0].rules_at(0) == []
    assert float(kept[-1.0].grad_sampled[0]) == pytest.approx(0.6, rel=REL)
    assert float(kept[1.0].grad_sampled[0]) == pytest.approx(-0.6, rel=REL)
    assert float(kept[1.0].grad_other_mass[0]) == pytest.approx(0.6, rel=REL)


def test_replay_multiplies_the_ratio_by_s_old_over_s_theta():
    # π_θ(y) = 0.2, π_old(y) = 0.1: r = 2. S_θ = 0.5, S_old = 0.25, ℓ_old over the whole
    # vocabulary (old_logp full).
    # full: the kept masses do not enter: r = 2 > 1.28, A = +1 → clip_upper, ∂L/∂z_y = 0;
    #   unclipped ppo: c = −2, ∂L/∂z_y = −2·(1 − 0.2) = −1.6.
    # kept: r̃ = (0.2/0.5)/(0.1/0.25) = 0.4/0.4 = 1 (= r·S_old/S_θ = 2·0.25/0.5), not clipped;
    #   π̃_θ(y) = 0.4, c = −1, ∂L/∂z_y = −1·(1 − 0.4) = −0.6 for ppo and ppo_clip alike.
    sets = ["support.kept_mass=0.5", "support.old_kept_mass=0.25"]
    full_clip = curves_at("ppo_clip", [0.1], 0.2, sets)[1.0]
    full_ppo = curves_at("ppo", [0.1], 0.2, sets)[1.0]
    assert float(full_clip.ratio[0]) == pytest.approx(2.0, rel=REL)
    assert full_clip.rules_at(0) == ["clip_upper"] and float(full_clip.grad_sampled[0]) == 0.0
    assert float(full_ppo.grad_sampled[0]) == pytest.approx(-1.6, rel=REL)
    replay = [*sets, "loss.sampling_support=kept"]
    for loss in ("ppo", "ppo_clip"):
        kept = curves_at(loss, [0.1], 0.2, replay)[1.0]
        assert float(kept.ratio[0]) == pytest.approx(1.0, rel=REL)
        assert kept.rules_at(0) == []
        assert float(kept.grad_sampled[0]) == pytest.approx(-0.6, rel=REL)


def test_a_kept_mass_of_one_changes_nothing():
    # S_θ = S_old = 1: K_t is the whole vocabulary, π̃ = π, and replay is the identity
    points = [1e-4, 0.01, 0.3, 0.9]
    for loss in ("reinforce", "ppo_clip", "cispo", "sft"):
        full = curves_at(loss, points, 0.5, [])
        kept = curves_at(loss, points, 0.5, ["loss.sampling_support=kept"])
        for sign in (1.0, -1.0):
            assert torch.equal(full[sign].grad_sampled, kept[sign].grad_sampled)
            assert torch.equal(full[sign].ratio, kept[sign].ratio)


def test_the_sampled_row_is_zero_where_pi_theta_fills_the_kept_set():
    # π_θ(y) = S_θ = 0.3: y is the only kept token with mass, π̃_θ(y) = 1, so 1 − π̃ = 0 and the
    # replayed gradient is 0 whatever c is; the summary names that cause.
    config = build_sweep_config(
        flags={"losses": ["reinforce"], "vary": "pi_theta", "pi_old.fixed": 0.3},
        sets=["support.kept_mass=0.3", "loss.sampling_support=kept"],
        axis={"min": 0.01, "max": 0.3, "points": 5, "scale": "linear"},
    )
    outcome = run_sweep(config)
    assert outcome.report.check.passed
    for curve, summary in zip(outcome.curves, outcome.report.summaries, strict=True):
        assert float(curve.grad_sampled[-1]) == 0.0 and float(curve.grad_sampled[0]) != 0.0
        assert summary.zero is not None and summary.zero[-1].cause == "1 − π̃_θ = 0"


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("old_logp", ["full", "kept"])
def test_autograd_check_agrees_at_replayed_points_for_every_loss(old_logp):
    # π_θ swept up to S_θ = 0.3 itself (π̃_θ(y) = 1 at the last point, the kept others at −inf)
    config = build_sweep_config(
        flags={"losses": loss_names(), "vary": "pi_theta", "pi_old.fixed": 0.05},
        sets=[
            "support.kept_mass=0.3",
            "support.old_kept_mass=0.2",
            f"support.old_logp={old_logp}",
            "loss.dual_clip=3",
        ],
        overs=["loss.sampling_support=full,kept"],
        axis={"min": 1e-4, "max": 0.3, "points": 41},
    )
    check = run_sweep(config).report.check
    assert check.passed, check.worst
    assert check.max_rel_err is not None and check.max_rel_err < TOLERANCE
    assert check.curves == len(loss_names()) * 2 * 2  # losses × variants × signs


def test_autograd_check_tells_replayed_from_full_gradients():
    # the replayed curve's closed form uses 1 − π̃_θ(y) = 1 − π_θ(y)/S_θ; swapping in the full
    # vocabulary's 1 − π_θ(y) (the same c) must fail the check at every point with π_θ(y) > 0
    config = build_sweep_config(
        flags={"losses": ["reinforce"], "pi_theta.fixed": 0.1},
        sets=["support.kept_mass=0.25", "loss.sampling_support=kept"],
        axis={"max": 0.25},
    )
    outcome = run_sweep(config)
    curve = outcome.curves[0]
    full = curve.coefficient * (1 - outcome.grid.pi_theta)  # c·(1 − 0.1) instead of c·(1 − 0.4)
    wrong = dataclasses.replace(curve, grad_sampled=full, grad_other_mass=full.abs())
    indices = outcome.grid.pick(5)
    assert float(check_curve(outcome.grid, curve, indices, 8).rel_err.max()) < TOLERANCE
    # |0.9 − 0.6| / 0.9 = 1/3 at every point
    err = check_curve(outcome.grid, wrong, indices, 8).rel_err
    assert torch.allclose(err, torch.full_like(err, 1 / 3), rtol=1e-12)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "sets, flags, names",
    [
        (["support.kept_mass=0.17"], {}, "support.kept_mass = 0.17 but π_θ(y) reaches 0.5"),
        (
            ["support.kept_mass=0.17"],
            {"pi_theta.fixed": 0.1},
            "S_old = 0.17 (support.old_kept_mass, or support.kept_mass when it is null) "
            "but π_old(y) reaches 0.5",
        ),
        (["support.kept_mass=0"], {}, "support.kept_mass"),
        (["support.old_logp=processed"], {}, "support.old_logp"),
        (
            ["support.kept_mass=0.9", "check.vocab_size=3"],
            {"pi_theta.fixed": 0.1},
            "check.vocab_size = 3",
        ),
    ],
)
def test_impossible_kept_sets_are_clear_errors(sets, flags, names):
    with pytest.raises(GradlensError) as err:
        build_sweep_config(sets=sets, flags=flags, axis={"max": 0.5} if flags else None)
    assert names in str(err.value)


def test_the_documented_command_shows_the_clip_decision_change():
    # docs/sweep.md §2.7: S = 0.17 on both sides, ℓ_old the engine's renormalised log-prob.
    # At π_old = π_θ = 0.1 the ratio without replay is 0.17 (< 0.8: clipped for A < 0), with
    # replay 1. Without replay ppo_clip is switched off for A < 0 wherever r·0.17 < 0.8, that is
    # π_old > 0.1·0.17/0.8 = 0.02125; with replay only where r < 0.8, π_old > 0.125.
    result = runner.invoke(
        app,
        [
            "sweep",
            "--losses",
            "reinforce,ppo_clip",
            "--over",
            "loss.sampling_support=full,kept",
            "--set",
            "support.kept_mass=0.17",
            "--set",
            "support.old_logp=kept",
            "--pi-theta",
            "0.1",
            "--min",
            "1e-3",
            "--max",
            "0.17",
            "--format",
            "summary",
            "--check",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    off = {
        s["variant"]: s["zero"][-1]
        for s in report["summaries"]
        if s["loss"] == "ppo_clip" and s["advantage"] < 0
    }
    step = 10 ** (2.2304 / 300)  # one grid step of 301 log points over [1e-3, 0.17]
    full, kept = off["loss.sampling_support=full"], off["loss.sampling_support=kept"]
    assert full["cause"] == kept["cause"] == "clip_lower"
    assert 0.02125 <= full["low"] <= 0.02125 * step and full["high"] == 0.17
    assert 0.125 <= kept["low"] <= 0.125 * step and kept["high"] == 0.17
