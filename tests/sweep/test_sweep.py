"""`gradlens sweep`: the curves against the closed form, the autograd check, the data formats,
the plot, the command line and its errors.

Most maths tests evaluate the curves at hand-picked points: `curves_at` builds a 1-D grid whose
π_old values are exactly the ones given, at a fixed π_θ, and returns {sign of A: Curve}.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.cli.common import EXIT_BAD_INPUT, EXIT_CHECK_FAILED
from gradlens.errors import GradlensError
from gradlens.losses import get_loss, loss_names
from gradlens.report.sparkline import sparkline
from gradlens.report.sweep_serialize import write_records
from gradlens.sweep import SweepConfig, build_sweep_config, run_sweep
from gradlens.sweep.check import TOLERANCE, check_curve
from gradlens.sweep.config import parse_over
from gradlens.sweep.curves import Curve
from gradlens.sweep.grid import axis_values, make_grid
from gradlens.sweep.records import BASE_COLUMNS
from gradlens.sweep.results import SweepPoint, SweepReport
from gradlens.sweep.summary import AMPLIFIED_ABOVE
from tests.sweep.points import curves_on_points

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
F64 = torch.float64

# The documented header of --format csv (docs/sweep.md), without --over columns.
HEADER = [
    "loss",
    "variant",
    "advantage",
    "pi_old",
    "pi_theta",
    "ratio",
    "weight",
    "coefficient",
    "grad_sampled",
    "grad_other_mass",
    "amplification",
    "zero_grad",
    "clipped",
    "rule",
    "checked",
    "check_rel_err",
]

ADVANTAGE_LOSSES = [n for n in loss_names() if get_loss(n).uses_advantage]


def invoke(*args: str):
    return runner.invoke(app, ["sweep", *args])


def curves_at(
    loss: str, pi_old: list[float], pi_theta: float = 0.5, **settings: object
) -> dict[float, Curve]:
    """{+1.0: curve at A = +1, −1.0: curve at A = −1} of ``loss`` at exactly these π_old."""
    config = build_sweep_config(
        flags={"losses": [loss]}, sets=[f"{k}={v}" for k, v in settings.items()]
    )
    return curves_on_points(config, loss, pi_old, pi_theta)


# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("loss", ADVANTAGE_LOSSES)
def test_on_policy_every_policy_loss_is_reinforce(loss):
    # r = 1 (π_old = π_θ): every importance weight, clip and gate is 1, so the sampled-row
    # gradient is REINFORCE's −A(1 − π_θ): −0.5 at A = +1 and +0.5 at A = −1 with π_θ = 0.5.
    curves = curves_at(loss, [0.5])
    assert float(curves[1.0].grad_sampled[0]) == pytest.approx(-0.5, rel=1e-12)
    assert float(curves[-1.0].grad_sampled[0]) == pytest.approx(0.5, rel=1e-12)
    assert float(curves[1.0].amplification[0]) == pytest.approx(1.0, rel=1e-12)


def test_hand_computed_ppo_clip_points():
    # losses.md TC3: A = +1, π_old = 0.4, π_θ = 0.5 → r = 1.25 < 1.28, unclipped:
    # g = −r = −1.25, ∂L/∂z_y = −1.25·(1 − 0.5) = −0.625, other rows Σ = 0.625.
    # losses.md TC5(b): A = −1, π_old = 0.125 → r = 4, no dual clip: g = +4, ∂L/∂z_y = 2.0.
    curves = curves_at("ppo_clip", [0.4, 0.125])
    pos, neg = curves[1.0], curves[-1.0]
    assert float(pos.ratio[0]) == pytest.approx(1.25, rel=1e-12)
    assert float(pos.grad_sampled[0]) == pytest.approx(-0.625, rel=1e-12)
    assert float(pos.grad_other_mass[0]) == pytest.approx(0.625, rel=1e-12)
    assert float(neg.grad_sampled[1]) == pytest.approx(2.0, rel=1e-12)
    assert not bool(neg.fired[1])


def test_clip_upper_switches_off_just_past_one_plus_eps_high():
    # π_θ = 0.5, ε_high = 0.28: the boundary is π_old = 0.5/1.28 = 0.390625. Just below it
    # r > 1.28 → clipped, ∂L/∂z_y = 0; just above it r < 1.28 → −r·(1 − π_θ).
    edge = 0.5 / 1.28
    below, above = edge * (1 - 1e-6), edge * (1 + 1e-6)
    pos = curves_at("ppo_clip", [below, above])[1.0]
    assert float(pos.grad_sampled[0]) == 0.0
    assert pos.rules_at(0) == ["clip_upper"]
    r = 0.5 / above
    assert float(pos.grad_sampled[1]) == pytest.approx(-r * 0.5, rel=1e-12)
    # the same points for A < 0 are not clipped (losses.md §2.2 asymmetry)
    neg = curves_at("ppo_clip", [below])[-1.0]
    assert float(neg.grad_sampled[0]) == pytest.approx((0.5 / below) * 0.5, rel=1e-12)


def test_unclipped_ppo_grows_as_one_over_pi_old():
    # ∂L/∂z_y = r·|A|·(1 − π_θ) with r = π_θ/π_old: halving π_old doubles it, and the ratio of
    # two points is the ratio of their 1/π_old.
    points = [1e-2, 5e-3, 1e-5]
    for curve in curves_at("ppo", points).values():
        g = curve.grad_sampled.abs()
        assert float(g[1] / g[0]) == pytest.approx(2.0, rel=1e-12)
        assert float(g[2] / g[0]) == pytest.approx(1e-2 / 1e-5, rel=1e-12)
        assert float(curve.amplification[2]) == pytest.approx(0.5 / 1e-5, rel=1e-12)


def test_dual_clip_switches_off_negative_advantage_beyond_c():
    # c = 3, π_θ = 0.5: r > 3 ⇔ π_old < 1/6. Beyond it the A < 0 gradient is 0 (rule
    # clip_dual); just inside, it is r·|A|·(1 − π_θ) = 3·0.5 ≈ 1.5. A > 0 is unaffected
    # there: r > 1 + ε_high clips it anyway.
    edge = 0.5 / 3
    neg = curves_at("ppo_clip", [edge * 0.99, edge * 1.01, 1e-6], **{"loss.dual_clip": 3})[-1.0]
    assert float(neg.grad_sampled[0]) == 0.0 and float(neg.grad_sampled[2]) == 0.0
    assert neg.rules_at(0) == ["clip_dual"]
    assert float(neg.grad_sampled[1]) == pytest.approx(0.5 / (edge * 1.01) * 0.5, rel=1e-12)


def test_sft_ignores_advantage_and_pi_old():
    curves = curves_at("sft", [1e-6, 0.3, 1.0])
    for curve in curves.values():
        assert torch.equal(curve.grad_sampled, torch.full((3,), -0.5, dtype=F64))
        assert bool(curve.amplification.isnan().all())


def test_aggregation_weight_of_a_lone_token():
    # seq_mean_token_sum_norm with loss_scale_factor L weights a one-token sequence by 1/L.
    config = build_sweep_config(
        sets=["loss.aggregation=seq_mean_token_sum_norm", "loss.loss_scale_factor=4"]
    )
    outcome = run_sweep(config)
    reinforce = next(c for c in outcome.curves if c.loss == "reinforce" and c.advantage > 0)
    assert reinforce.weight == 0.25
    assert float(reinforce.grad_sampled[0]) == pytest.approx(-0.5 / 4, rel=1e-12)
    assert float(reinforce.amplification[0]) == 1.0  # relative to REINFORCE: weight cancels


# ----------------------------------------------------------------------------- coupled losses


def test_real_pairs_the_two_signs_of_a_point_in_one_group():
    # π_θ = 0.5, τ = 0.5; the group {A = +1, A = −1} shares the score s = ln r:
    #   g₊ = −(1/τ)·σ(−s/τ), g₋ = +(1/τ)·σ(s/τ) (G = 1, |o| = 1; REAL aggregates itself, a = 1)
    #   π_old = 0.25: r = 2, s/τ = 2 ln 2 = 1.386294, σ(−1.386294) = 1/(1 + 4) = 0.2:
    #     g₊ = −0.4, g₋ = 2·0.8 = 1.6; ∂L/∂z_y = g·(1 − 0.5) = −0.2 and +0.8
    #   π_old = 0.5: s = 0, σ = 1/2: g₊ = −1, g₋ = +1 (REINFORCE)
    curves = curves_at("real", [0.25, 0.5])
    pos, neg = curves[1.0], curves[-1.0]
    assert pos.weight == 1.0 and neg.weight == 1.0
    assert pos.grad_sampled.tolist() == pytest.approx([-0.2, -0.5], rel=1e-12)
    assert neg.grad_sampled.tolist() == pytest.approx([0.8, 0.5], rel=1e-12)


def test_batch_coupled_losses_draw_a_lone_token():
    # A lone token's covariance is 0: Clip-Cov never selects it (band (1, 5)) and draws
    # ppo_clip; KL-Cov's top-1 is the token itself: g = −A·r + k·sign(ln r), k = 0.1:
    #   π_old = 0.25 (r = 2): A = +1: −2 + 0.1 = −1.9;  π_old = 1 (r = 0.5): −0.5 − 0.1 = −0.6
    # M2PO without a rollout policy has M2 = 0 and never masks: ppo_clip again.
    pi_old = [0.25, 0.5, 1.0]
    ppo_clip = curves_at("ppo_clip", pi_old)
    for name in ("clip_cov", "m2po"):
        for sign, curve in curves_at(name, pi_old).items():
            assert torch.equal(curve.coefficient, ppo_clip[sign].coefficient), (name, sign)
    kl_cov = curves_at("kl_cov", pi_old)
    assert kl_cov[1.0].coefficient.tolist() == pytest.approx([-1.9, -1.0, -0.6], rel=1e-12)
    assert kl_cov[-1.0].coefficient.tolist() == pytest.approx([2.1, 1.0, 0.4], rel=1e-12)
    assert bool(kl_cov[1.0].regions["cov_selected"].all())


def test_aspo_draws_its_narrow_width_and_both_dual_clips():
    # A lone token is never above its own entropy quantile: width 0.2 (c⁻ = c⁺ = 3).
    #   A = +1: r = 2 and 1.25 > 1.2: clipped, 0; r = 0.625: −1/r = −1.6 (∂L/∂z_y = −0.8)
    #   A = −1: r = 4 > 3: −A·c⁻ = +3 (∂L/∂z_y = 1.5); r = 0.625 < 0.8: clipped
    curves = curves_at("aspo", [0.25, 0.4, 0.8, 0.125])
    assert curves[1.0].coefficient.tolist() == pytest.approx([0.0, 0.0, -1.6, 0.0], abs=1e-12)
    assert curves[-1.0].coefficient.tolist() == pytest.approx([2.0, 1.25, 0.0, 3.0], abs=1e-12)


def test_coupled_losses_refuse_grids_too_large_to_loop_over():
    result = invoke("--vary", "both", "--losses", "kl_cov,real")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "kl_cov is batch-coupled" in result.output and "real is group-coupled" in result.output
    assert "--points 100" in result.output
    ok = invoke("--vary", "both", "--losses", "kl_cov,real", "--points", "21", "--check")
    assert ok.exit_code == 0, ok.output


# ----------------------------------------------------------------------------- autograd check


@pytest.mark.slow
def test_autograd_check_agrees_for_every_loss_and_rule():
    config = build_sweep_config(
        flags={"losses": loss_names()},
        sets=["loss.opsm_delta=0.5"],
        overs=["loss.dual_clip=null,3"],
    )
    report = run_sweep(config).report
    check = report.check
    assert check.passed, check.worst
    assert check.max_rel_err is not None and check.max_rel_err < TOLERANCE
    assert check.points == config.check.points
    assert check.curves == len(loss_names()) * 2 * 2  # losses × variants × signs


def test_autograd_check_catches_a_wrong_closed_form():
    outcome = run_sweep(SweepConfig(losses=["ppo"]))
    curve = outcome.curves[0]
    wrong = dataclasses.replace(curve, grad_sampled=curve.grad_sampled * (1 + 1e-6))
    indices = outcome.grid.pick(5)
    result = check_curve(outcome.grid, wrong, indices, vocab_size=8)
    assert float(result.rel_err.max()) > 1e-7


def test_check_runs_at_the_stated_points_including_pi_theta_one():
    # a π_θ sweep ends at π_θ = 1, where 1 − π_θ = 0 and the other logits are −inf
    outcome = run_sweep(build_sweep_config(flags={"vary": "pi_theta"}))
    check = outcome.report.check
    assert check.passed
    assert check.checked_x[0] == 1e-6 and check.checked_x[-1] == 1.0
    rows = [r for r in outcome.rows() if r["checked"]]
    assert len(rows) == check.points * len(outcome.curves)


# ----------------------------------------------------------------------------- grid, summary


def test_axis_ends_are_exact_and_grid_layout_is_row_major():
    values = axis_values(1e-6, 1.0, 301, "log")
    assert float(values[0]) == 1e-6 and float(values[-1]) == 1.0
    assert float(values[150]) == pytest.approx(1e-3, rel=1e-12)
    grid = make_grid(
        "both", {"pi_old": (0.1, 1.0, 3, "linear"), "pi_theta": (0.2, 0.8, 2, "linear")}, {}
    )
    assert grid.shape == (2, 3)
    assert grid.pi_old.reshape(grid.shape)[1].tolist() == pytest.approx([0.1, 0.55, 1.0])
    assert grid.pi_theta.reshape(grid.shape)[:, 0].tolist() == pytest.approx([0.2, 0.8])


def test_default_summary_locates_the_clip_and_the_explosion():
    report = run_sweep(SweepConfig()).report
    by = {(s.loss, s.advantage): s for s in report.summaries}
    clip_pos = by[("ppo_clip", 1.0)]
    (run,) = clip_pos.zero
    assert run.low == 1e-6 and run.cause == "clip_upper"
    assert run.high < 0.5 / 1.28 < run.high * 10 ** (1 / 50) * 1.0000001  # next grid point
    ppo = by[("ppo", 1.0)]
    assert ppo.max_at_pi_old == 1e-6 and ppo.max_amplification == pytest.approx(5e5, rel=1e-9)
    (amplified,) = ppo.amplified
    # > 10× REINFORCE ⇔ r > 10 ⇔ π_old < 0.05
    assert amplified.low == 1e-6 and amplified.high < 0.05 < amplified.high * 1.05
    assert by[("ppo_clip", -1.0)].max_amplification == pytest.approx(5e5, rel=1e-9)
    assert by[("reinforce", 1.0)].zero == [] and report.amplified_above == AMPLIFIED_ABOVE


def test_sparkline_marks_zeros_and_scales_by_log():
    line = sparkline([0.0, 1e-3, 1.0, 1e3], width=10, bounds=(1e-3, 1e3))
    assert line == "·▁▅█"


# ----------------------------------------------------------------------------- data formats


@pytest.fixture(scope="module")
def outcome_over():
    config = build_sweep_config(
        flags={"losses": ["reinforce", "ppo_clip"]},
        axis={"points": 21},
        overs=["loss.eps_high=0.2,0.28"],
    )
    return run_sweep(config)


def _write(outcome, fmt: str) -> str:
    stream = io.StringIO()
    write_records(outcome.rows(), outcome.columns(), fmt, stream)
    return stream.getvalue()


def test_csv_is_one_flat_table_with_the_documented_header(outcome_over):
    text = _write(outcome_over, "csv")
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    assert header == [*HEADER[:2], "loss.eps_high", *HEADER[2:]]
    assert BASE_COLUMNS == HEADER
    body = rows[1:]
    assert len(body) == 21 * 2 * 2 * 2  # points × losses × variants × signs
    assert all(len(r) == len(header) for r in body)
    records = list(csv.DictReader(io.StringIO(text)))
    assert {r["loss.eps_high"] for r in records} == {"0.2", "0.28"}
    assert {r["rule"] for r in records} >= {"none", "clip_upper"}
    for r in records:
        float(r["pi_old"]), float(r["grad_sampled"])  # plain numbers
        assert r["zero_grad"] in ("True", "False")


def test_csv_and_json_load_in_pandas(outcome_over, tmp_path):
    pd = pytest.importorskip("pandas")
    for fmt, read in (
        ("csv", pd.read_csv),
        ("json", pd.read_json),
        ("jsonl", lambda f: pd.read_json(f, lines=True)),
    ):
        path = tmp_path / f"sweep.{fmt}"
        path.write_text(_write(outcome_over, fmt), encoding="utf-8")
        frame = read(path)
        assert list(frame.columns) == outcome_over.columns()
        assert len(frame) == outcome_over.num_rows
        assert frame.groupby(["loss", "variant", "advantage"]).size().eq(21).all()


def test_json_and_jsonl_records(outcome_over):
    array = json.loads(_write(outcome_over, "json"))
    lines = [json.loads(line) for line in _write(outcome_over, "jsonl").splitlines()]
    assert array == lines
    assert len(array) == outcome_over.num_rows
    for record in array:
        assert list(record) == outcome_over.columns()
        assert all(not isinstance(v, (dict, list)) for v in record.values())
        SweepPoint.model_validate(record)


def test_records_of_checked_points_carry_their_error(outcome_over):
    checked = [r for r in outcome_over.rows() if r["checked"]]
    assert checked and all(r["check_rel_err"] < TOLERANCE for r in checked)
    unchecked = [r for r in outcome_over.rows() if not r["checked"]]
    assert all(r["check_rel_err"] is None for r in unchecked)


# ----------------------------------------------------------------------------- summary

STEP = 10 ** (6 / 300)  # ratio of neighbouring points of the default grid (301 over 6 decades)


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in the JSON: a non-finite number must be null")


def summary_of(*args: str) -> tuple[dict, SweepReport]:
    """``gradlens sweep --format summary ARGS``: the parsed document and the validated report."""
    result = invoke("--format", "summary", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=_no_constant)
    return data, SweepReport.model_validate(data)


def _longest_list(value: object) -> int:
    if isinstance(value, dict):
        return max((_longest_list(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max([len(value), *(_longest_list(v) for v in value)])
    return 0


def test_summary_is_the_report_as_one_json_document_obeying_its_schema():
    data, report = summary_of()
    assert data["schema_version"] == "gradlens.sweep/2"
    # exactly the report the table is drawn from, and it survives the round trip losslessly
    assert report == run_sweep(SweepConfig()).report
    schema = json.loads(runner.invoke(app, ["schema", "--report", "sweep"]).stdout)
    assert schema["$id"] == "gradlens.sweep/2"
    assert set(data) == set(schema["properties"]) >= set(schema["required"])
    curve = schema["$defs"]["CurveSummary"]
    assert all(set(s) == set(curve["properties"]) for s in data["summaries"])
    assert set(data["check"]) == set(schema["$defs"]["CheckSummary"]["properties"])
    assert [(s["loss"], s["advantage"]) for s in data["summaries"]] == [
        (loss, sign) for loss in ("reinforce", "ppo", "ppo_clip", "sft") for sign in (1.0, -1.0)
    ]
    assert data["passed"] is True
    assert _longest_list(data) < 301  # a summary, not the per-point records


def test_summary_matches_the_table_of_the_default_sweep():
    _, report = summary_of()
    table = invoke().stdout
    by = {(s.loss, s.advantage): s for s in report.summaries}
    # ppo_clip, A > 0: zero from π_old = 1e-6 up to the clip edge π_θ/(1 + ε_high) = 0.390625;
    # the run ends at the last grid point before the edge, so the edge lies within one step
    (run,) = by["ppo_clip", 1.0].zero
    assert run.cause == "clip_upper" and run.low == 1e-6
    assert run.high < 0.5 / 1.28 < run.high * STEP * (1 + 1e-9)
    assert f"{run.high:.3g}" == "0.38"
    assert "π_old ∈ [1e-06, 0.38] (clip_upper)" in table
    # ppo_clip, A < 0: zero above the edge π_θ/(1 − ε_low) = 0.625, up to 1, by clip_lower
    (run,) = by["ppo_clip", -1.0].zero
    assert run.cause == "clip_lower" and run.high == 1.0
    assert run.low / (STEP * (1 + 1e-9)) < 0.5 / 0.8 < run.low
    assert f"π_old ∈ [{run.low:.3g}, 1] (clip_lower)" in table
    # ppo at both signs, and ppo_clip at A < 0: > 10× REINFORCE ⇔ r > 10 ⇔ π_old < 0.05;
    # the maximum 5e5× = π_θ/π_old at the first grid point
    for key in (("ppo", 1.0), ("ppo", -1.0), ("ppo_clip", -1.0)):
        s = by[key]
        (amp,) = s.amplified
        assert amp.low == 1e-6 and amp.high < 0.05 < amp.high * STEP * (1 + 1e-9)
        assert s.max_amplification == pytest.approx(5e5, rel=1e-9)
        assert s.max_at_pi_old == 1e-6 and s.max_grad == pytest.approx(2.5e5, rel=1e-9)
        assert f"π_old ∈ [1e-06, {amp.high:.3g}]" in table
    assert "up to 5e+05× REINFORCE (|∂L/∂z_y| = 2.5e+05 at π_old = 1e-06)" in table
    assert by["ppo", 1.0].zero == [] and by["ppo_clip", 1.0].amplified == []
    assert by["ppo_clip", 1.0].max_amplification == pytest.approx(1.28, rel=STEP - 1)
    # reinforce is REINFORCE everywhere; sft ignores A, so no amplification applies (n/a)
    for sign in (1.0, -1.0):
        reinforce, sft = by["reinforce", sign], by["sft", sign]
        assert reinforce.zero == [] and reinforce.amplified == [] and reinforce.damped == []
        assert reinforce.max_amplification == pytest.approx(1.0, rel=1e-12)
        assert sft.amplified is None and sft.damped is None and sft.amplified_share is None
        assert sft.max_amplification is None and sft.max_grad == pytest.approx(0.5)
    assert all(s.non_finite == 0 for s in report.summaries)
    # the autograd check, as the table's last line gives it
    check = report.check
    assert report.passed and check.passed and check.curves == 8 and check.points == 9
    assert check.max_rel_err is not None and check.max_rel_err < check.tolerance == TOLERANCE
    assert f"max relative error {check.max_rel_err:.2g} (tolerance 1e-09) ok" in table
    assert all(s.check_max_rel_err is not None for s in report.summaries)


def test_summary_max_amplification_of_ppo_grows_as_one_over_pi_old_min():
    # unclipped ppo: |g|/|A| = r = π_θ/π_old, largest at the smallest π_old swept
    largest = {}
    for low in (1e-2, 1e-4, 1e-6):
        _, report = summary_of("--losses", "ppo", "--min", str(low), "--points", "61")
        for s in report.summaries:
            assert s.max_at_pi_old == low
            assert s.max_amplification == pytest.approx(0.5 / low, rel=1e-9)
            assert s.max_grad == pytest.approx(0.5 / low * (1 - 0.5), rel=1e-9)
        largest[low] = report.summaries[0].max_amplification
    assert largest[1e-4] / largest[1e-2] == pytest.approx(100, rel=1e-9)
    assert largest[1e-6] / largest[1e-2] == pytest.approx(10_000, rel=1e-9)


def test_summary_of_a_2d_sweep_gives_shares_not_intervals():
    args = ("--vary", "both", "--points", "41", "--losses", "ppo,ppo_clip")
    _, report = summary_of(*args)
    assert [a.name for a in report.axes] == ["pi_old", "pi_theta"] and report.fixed == {}
    # the same grid, computed here: r = π_θ/π_old at every (π_θ, π_old)
    values = axis_values(1e-6, 1.0, 41, "log")
    pi_theta, pi_old = torch.meshgrid(values, values, indexing="ij")
    r, top = pi_theta / pi_old, pi_theta == 1.0  # at π_θ = 1, 1 − π_θ = 0: zero for every loss

    def share(mask: torch.Tensor) -> float:
        return float(mask.sum()) / mask.numel()

    by = {(s.loss, s.advantage): s for s in report.summaries}
    for s in report.summaries:
        assert s.zero is None and s.amplified is None and s.damped is None
    for sign in (1.0, -1.0):
        ppo = by["ppo", sign]
        assert ppo.amplified_share == pytest.approx(share(r > 10), abs=1e-12)
        assert ppo.amplified_share > 0.3
        assert ppo.zero_share == pytest.approx(share(top), abs=1e-12)
        assert ppo.switched_off_share == 0
    clip = {1.0: r > 1.28, -1.0: r < 0.8}  # clip_upper at A > 0, clip_lower at A < 0
    for sign, fired in clip.items():
        s = by["ppo_clip", sign]
        assert s.switched_off_share == pytest.approx(share(fired), abs=1e-12)
        assert s.zero_share == pytest.approx(share(fired | top), abs=1e-12)
        assert s.zero_share > s.switched_off_share > 0.4
    assert by["ppo_clip", 1.0].amplified_share == 0
    table = invoke(*args).stdout
    for s in report.summaries:
        assert f"{s.zero_share:.1%}" in table and f"{s.switched_off_share:.1%}" in table


def test_summary_to_a_file_with_the_table_on_stdout(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("an older summary\n", encoding="utf-8")
    result = invoke("--format", "summary", "--output", str(path), "--check", "--points", "31")
    assert result.exit_code == 0, result.output
    assert "explodes" in result.stdout and "ok" in result.stdout  # the table
    assert "wrote the summary (gradlens.sweep/2) to" in result.stderr
    report = SweepReport.model_validate_json(path.read_text(encoding="utf-8"))
    assert report.passed and report.axes[0].points == 31
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_summary_of_a_failed_check_has_nulls_and_exits_1():
    # π_old = 1e-320 (subnormal): r = π_θ/π_old overflows, so ppo's gradient there and the
    # autograd check's error are not finite; both are null and the check fails
    args = ("--format", "summary", "--losses", "ppo", "--min", "1e-320", "--points", "11")
    result = invoke(*args, "--check")
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    data = json.loads(result.stdout, parse_constant=_no_constant)
    SweepReport.model_validate(data)
    assert data["passed"] is False and data["check"]["passed"] is False
    assert data["check"]["max_rel_err"] is None and "π_old = 1e-320" in data["check"]["worst"]
    for s in data["summaries"]:
        assert s["non_finite"] == 1 and s["check_max_rel_err"] is None
        assert math.isfinite(s["max_grad"]) and s["max_at_pi_old"] > 1e-300  # skips the overflow
    unchecked = invoke(*args)  # without --check: the same document, exit 0
    assert unchecked.exit_code == 0 and unchecked.stdout == result.stdout


@pytest.mark.parametrize("fmt", ["summary", "json"])
def test_bad_input_with_summary_is_handled_like_the_other_formats(tmp_path, fmt):
    path = tmp_path / "out.json"
    result = invoke("--format", fmt, "--output", str(path), "--min", "0.5", "--max", "0.1")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "pi_old: the range is inverted" in result.stderr
    assert result.stdout == "" and not path.exists()
    # a missing parent folder is created (gradlens.files); a parent that is a file cannot be
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = invoke("--format", fmt, "--output", str(blocker / "out.json"))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--output" in result.stderr
    assert "Traceback" not in result.output + result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == [blocker]


def test_an_unknown_format_names_summary_among_the_choices():
    result = invoke("--format", "summry")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "'summry' is not one of" in result.stderr and "'summary'" in result.stderr


@pytest.mark.parametrize("fmt", ["summary", "csv"])
def test_a_failed_write_leaves_no_half_written_file(tmp_path, monkeypatch, fmt):
    from gradlens.report import sweep_serialize

    def fail(*args: object) -> None:
        stream = next(a for a in args if isinstance(a, io.TextIOBase))
        stream.write("the first half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        sweep_serialize, "write_summary" if fmt == "summary" else "write_records", fail
    )
    path = tmp_path / "out.txt"
    path.write_text("the previous run\n", encoding="utf-8")
    result = invoke("--format", fmt, "--output", str(path), "--points", "11")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "No space left on device" in result.stderr
    assert path.read_text(encoding="utf-8") == "the previous run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ----------------------------------------------------------------------------- plot


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--vary", "both", "--points", "21"]], ids=["1d", "2d"])
def test_plot_writes_a_png(tmp_path, monkeypatch, args):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = tmp_path / "sweep.png"
    result = invoke("--plot", str(path), *args)
    assert result.exit_code == 0, result.output
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = invoke("--plot", str(tmp_path / "sweep.png"))
    assert result.exit_code == 2
    assert "--plot needs matplotlib" in result.stderr
    assert not (tmp_path / "sweep.png").exists()


# ----------------------------------------------------------------------------- command line


def test_default_sweep_shows_the_explosion_and_the_clip():
    result = invoke()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "explodes: up to 5e+05× REINFORCE" in out
    assert "switched off (∂L/∂z_y = 0) for π_old ∈ [1e-06, 0.38] by clip_upper" in out
    assert "π_old ∈ [0.631, 1] (clip_lower)" in out
    assert "not enabled: clip_dual" in out  # A < 0 is not clipped at high r without dual clip
    assert "closed form vs autograd" in out and " ok" in out


def test_data_to_stdout_and_to_a_file(tmp_path):
    result = invoke("--format", "jsonl", "--points", "11")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 11 * 4 * 2
    path = tmp_path / "sweep.csv"
    result = invoke("--output", str(path), "--points", "11")  # format from the suffix
    assert result.exit_code == 0, result.output
    assert "explodes" in result.stdout  # the table goes to stdout instead
    assert path.read_text(encoding="utf-8").startswith(",".join(HEADER))


def test_over_compares_settings_on_the_same_axes():
    result = invoke("--losses", "ppo_clip", "--over", "loss.dual_clip=null,3", "-f", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert {r["loss.dual_clip"] for r in records} == {None, 3.0}
    dual = [r for r in records if r["loss.dual_clip"] == 3.0 and r["advantage"] < 0]
    assert any(r["rule"] == "clip_dual" and r["zero_grad"] for r in dual)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--min", "0.5", "--max", "0.1"], "pi_old: the range is inverted"),
        (["--min", "0.3", "--max", "0.3"], "pi_old: the range is empty"),
        (["--min", "0"], "pi_old.min"),
        (["--max", "1.5"], "pi_old.max"),
        (["--points", "1"], "pi_old.points"),
        (["--pi-theta", "0"], "pi_theta.fixed"),
        (["--vary", "pi_theta", "--pi-old", "1.01"], "pi_old.fixed"),
        (["--vary", "pi_theta", "--pi-theta", "0.3"], "--pi-theta"),
        (["--advantage", "-1"], "advantage"),
        (["--losses", "ppo,ppo_clp"], "did you mean 'ppo_clip'"),
        (["--over", "loss.eps_hgh=0.1,0.2"], "did you mean 'eps_high'"),
        (["--over", "loss.eps_high="], "no values"),
        (["--over", "loss.eps_high"], "expected KEY=V1,V2"),
        (["--over", "loss.eps_high=-1,0.2"], "loss.eps_high"),
        (["--over", "pi_old.min=0.1,0.2"], "defines the axis"),
        (["--over", "pi_old.fixed=0.1,0.2"], "pi_old.fixed is unused"),
        (["--set", "pi_old.foo=1"], "pi_old.foo: unknown key; allowed here: fixed, max"),
        (["--output", "sweep.txt"], "--output"),
        (["--plot", "sweep.gif"], "--plot"),
    ],
)
def test_bad_input_is_a_clear_error(args, names):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert names in result.stderr
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("sweep_*.yaml")))
def test_every_sweep_config_runs(path):
    result = invoke("--config", str(REPO / "configs" / path), "--check", "-f", "csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("loss,variant")


def test_sweep_configs_exist():
    names = {p.name for p in (REPO / "configs").glob("sweep_*.yaml")}
    assert {"sweep_pi_old.yaml", "sweep_pi_theta.yaml", "sweep_grid.yaml"} <= names
    assert "sweep_dual_clip.yaml" in names


def test_default_config_file_is_the_built_in_default():
    from_file = build_sweep_config(REPO / "configs" / "sweep_pi_old.yaml")
    assert from_file == SweepConfig()
    assert math.isclose(from_file.pi_old.min, 1e-6)


USER_LOSSES = """import torch


def pg(logp, old_logp, advantages, mask):
    return -(logp * advantages * mask).sum() / mask.sum()


def not_a_number(logp, old_logp, advantages, mask):
    return (logp * float("nan")).sum()
"""


def test_a_loss_that_aggregates_itself_has_a_lone_tokens_gradient(tmp_path, monkeypatch):
    # Called on every point at once, its token mean divided each point's gradient by the 2·18
    # points of the grid (g = −A/36 where REINFORCE's is −A), and `--check` failed (0.99)
    (tmp_path / "mine.py").write_text(USER_LOSSES)
    monkeypatch.chdir(tmp_path)
    result = invoke("--check", "-l", "mine.py:pg,reinforce", "-f", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the rows, one per point and curve
    mine = [r for r in rows if r["loss"] == "mine.py:pg"]
    ours = [r for r in rows if r["loss"] == "reinforce"]
    assert len(mine) == len(ours) > 0
    for a, b in zip(mine, ours, strict=True):
        assert (a["pi_old"], a["advantage"]) == (b["pi_old"], b["advantage"])
        assert a["coefficient"] == pytest.approx(b["coefficient"], rel=1e-12)
        assert a["grad_sampled"] == pytest.approx(b["grad_sampled"], rel=1e-12)


def test_a_loss_that_is_not_a_number_fails_the_check(tmp_path, monkeypatch):
    # both paths NaN: the relative error was taken as 0 and `--check` passed
    (tmp_path / "mine.py").write_text(USER_LOSSES)
    monkeypatch.chdir(tmp_path)
    result = invoke("--check", "-l", "mine.py:not_a_number", "--format", "summary")
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    check = json.loads(result.stdout)["check"]
    assert not check["passed"] and check["max_rel_err"] is None
    assert "mine.py:not_a_number" in check["worst"]


def test_an_over_value_that_is_not_yaml_names_its_column_in_the_users_text():
    # the values are parsed wrapped in brackets; the columns count the user's characters
    with pytest.raises(GradlensError) as refused:
        parse_over("loss.eps_high=0.2,{a: 1, a: 2}")
    assert str(refused.value).endswith(
        "(line 1, column 12: found the key 'a' a second time (first on line 1), while reading "
        "a mapping at line 1, column 5)"
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--over", "loss.distill.divergence=forward_kl,jsd"], "loss.distill.divergence cannot"),
        (["--over", "loss.corrections.kind=tis"], "loss.corrections.kind cannot be swept"),
        (["--over", "loss.entropy_coef=0,0.01"], "loss.entropy_coef cannot be swept"),
        (["--set", "loss.entropy_coef=0.01"], "loss.entropy_coef: the sweep draws"),
        (["--set", "loss.top_entropy_quantile=0.2"], "loss.top_entropy_quantile: the sweep"),
        (["--set", "loss.distill={divergence: jsd}"], "loss.distill: the sweep draws"),
    ],
)
def test_settings_the_sweep_does_not_draw_are_refused_not_left_out(argv, named) -> None:
    # a point has no rollout policy, no batch and no teacher: the curves would be the same
    # with and without these, so the sweep says so rather than draw identical variants
    result = CliRunner().invoke(app, ["sweep", "-n", "5", *argv])
    assert result.exit_code == EXIT_BAD_INPUT
    assert named in result.output and "acts outside them" in result.output


def test_a_key_under_a_section_given_as_null_starts_the_section() -> None:
    from gradlens.config import apply_override

    data: dict = {"loss": {"distill": None}}
    apply_override(data, ["loss", "distill", "divergence"], "jsd")
    assert data == {"loss": {"distill": {"divergence": "jsd"}}}


def test_findings_over_several_advantages_name_the_sign_they_hold_for() -> None:
    # clip_upper switches ppo_clip off for A > 0 only, at |A| = 1 and 2 alike: two sizes of
    # one sign, not "A = ±1"
    result = CliRunner().invoke(
        app, ["sweep", "-n", "3", "-l", "ppo_clip", "--over", "advantage=1,2"]
    )
    lines = [line for line in result.output.splitlines() if line.startswith("•")]
    assert any(line.startswith("• ppo_clip, A > 0: switched off") for line in lines), lines
    assert any(line.startswith("• ppo_clip, A < 0: switched off") for line in lines), lines
    assert not any("±" in line for line in lines), lines


def test_over_takes_the_bracketed_list_that_parity_matrix_takes() -> None:
    from gradlens.sweep.config import parse_over

    assert parse_over("loss.aggregation=[token_mean, token_sum]") == (
        "loss.aggregation",
        ["token_mean", "token_sum"],
    )
    assert parse_over("loss.aggregation=token_mean,token_sum")[1] == ["token_mean", "token_sum"]
    assert parse_over("loss.dual_clip=null,3")[1] == [None, 3]
