"""``gradlens losses --compare A,B`` (gradlens.sweep.pair): where two losses' g_t differ over
(r, A), against the g_t written out from docs/losses.md §2, and the command's output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.errors import GradlensError
from gradlens.losses import LossParams
from gradlens.sweep.pair import DEFAULT_RATIOS, compare_pair

# Both sides are float64 evaluations of closed forms at the same point: a few ulps.
ABS = 1e-12


def test_reinforce_and_ppo_differ_wherever_r_is_not_one() -> None:
    # reinforce g = −A, ppo g = −A·r (losses.md §2.1–2.2): equal only at r = 1
    table = compare_pair("reinforce", "ppo")
    for row in table.rows:
        assert row.grad_a == pytest.approx(-row.advantage, abs=ABS)
        assert row.grad_b == pytest.approx(-row.advantage * row.ratio, abs=ABS)
    others = tuple(r for r in DEFAULT_RATIOS if r != 1.0)
    assert table.differing(1.0) == others
    assert table.differing(-1.0) == others


def test_ppo_and_ppo_clip_differ_outside_the_clip_band_by_sign() -> None:
    # ppo_clip zeroes g where A > 0 and r > 1 + eps_high, or A < 0 and r < 1 − eps_low
    params = LossParams(eps_low=0.2, eps_high=0.28)
    table = compare_pair("ppo", "ppo_clip", params)
    assert table.differing(1.0) == tuple(r for r in DEFAULT_RATIOS if r > 1.28)
    assert table.differing(-1.0) == tuple(r for r in DEFAULT_RATIOS if r < 0.8)
    for row in table.rows:
        if row.differ:
            assert row.grad_b == 0.0
            assert row.rules_b == (("clip_upper",) if row.advantage > 0 else ("clip_lower",))
        else:
            assert row.grad_a == pytest.approx(row.grad_b, abs=ABS)


def test_dual_clip_adds_the_negative_side_above_c() -> None:
    # with dual_clip c = 3, ppo_clip's g for A < 0 is 0 above r = 3 as well (clip_dual)
    table = compare_pair("ppo", "ppo_clip", LossParams(eps_low=0.2, eps_high=0.28, dual_clip=3.0))
    assert table.differing(-1.0) == tuple(r for r in DEFAULT_RATIOS if r < 0.8 or r > 3.0)


def test_identical_losses_are_refused_and_bad_ratios_named() -> None:
    with pytest.raises(GradlensError, match="two different losses"):
        compare_pair("ppo", "ppo")
    with pytest.raises(GradlensError, match="π_old = π_θ/r"):
        compare_pair("ppo", "ppo_clip", ratios=(0.05,))


def test_losses_compare_command() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["losses", "--compare", "ppo,ppo_clip", "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert (data["loss_a"], data["loss_b"]) == ("ppo", "ppo_clip")
    assert len(data["rows"]) == 2 * len(DEFAULT_RATIOS)
    # --set reaches the settings: eps_high = 0.5 keeps r = 1.29 and 1.5 unclipped
    out = runner.invoke(app, ["losses", "--compare", "ppo,ppo_clip", "--set", "loss.eps_high=0.5"])
    assert out.exit_code == 0, out.output
    assert "A > 0: ppo and ppo_clip differ at r = 2, 2.9, 3.1, 5, 10" in out.output
    bad = runner.invoke(app, ["losses", "--compare", "ppo"])
    assert bad.exit_code != 0 and "two losses A,B" in bad.output
    unknown = runner.invoke(app, ["losses", "--compare", "ppo,ppo_clp"])
    assert unknown.exit_code != 0 and "ppo_clip" in unknown.output  # the closest name


def test_losses_help_names_compare() -> None:
    out = CliRunner().invoke(app, ["losses", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    assert "--compare" in out.output and "r = π_θ/π_old" in out.output


def test_a_gradient_that_is_not_a_number_differs_everywhere(tmp_path, monkeypatch) -> None:
    (tmp_path / "mine.py").write_text(
        "def nan(logp, old_logp, advantages, mask):\n    return (logp * float('nan')).sum()\n"
    )
    monkeypatch.chdir(tmp_path)
    table = compare_pair("mine.py:nan", "ppo")
    assert table.differing(1.0) == DEFAULT_RATIOS and table.differing(-1.0) == DEFAULT_RATIOS
