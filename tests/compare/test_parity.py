"""``--parity A,B``: two implementations of "the same" loss on one batch.

The Liger-Kernel issue 1082 case: a fused GRPO loss gave ~100× the grad_norm of TRL's reference
path, from a different normaliser and a missing importance-sampling weight. Here each mistake is
written as a user loss next to a correct one, and parity must catch the first two and pass the
third. Also: the metric-name crosswalk in the JSON report, and ``gradlens losses``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import random_batch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.compare.parity import build_parity, materialized_inputs
from gradlens.config import validate
from gradlens.grads import softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss, loss_names
from gradlens.metric_names import METRIC_NAMES
from gradlens.results import CompareReport

runner = CliRunner()


def run(a: str, b: str, **extra: Any) -> CompareReport:
    data = {
        "losses": [a, b],
        "parity": {"pairs": [[a, b]]},
        "source": {"vocab_size": 64, "hidden_size": 8, "num_sequences": 8, "max_length": 24},
        **extra,
    }
    return run_compare(validate(data))


def test_liger_1082_a_summed_normaliser_is_caught(impl: str) -> None:
    report = run("ppo_clip", f"{impl}:token_sum")
    (p,) = report.parity
    assert not p.passed and not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["parity"]  # each loss on its own is fine
    n_tok = report.batch.num_tokens
    # the same surrogate summed instead of averaged: every c_t and ‖∂L/∂W‖ grow N_tok-fold
    assert p.grad_norm_ratio == pytest.approx(n_tok, rel=1e-5)
    assert any(f"c_B/c_A = N_tok = {n_tok}," in f and "token_sum (B)" in f for f in p.findings)
    assert p.a.clipping.region is not None  # clip fractions side by side
    assert p.differing_tokens > 0 and p.top and p.top[0].abs_diff is not None


def test_liger_1082_a_missing_importance_weight_is_caught(impl: str) -> None:
    report = run("ppo_clip", f"{impl}:no_is_weight")
    (p,) = report.parity
    assert not p.passed
    assert p.grad_norm_ratio is not None and p.grad_norm_ratio != pytest.approx(1.0, abs=1e-3)
    assert any("r_t^-1" in f and "importance weight" in f for f in p.findings)


def test_two_implementations_that_agree_pass(impl: str) -> None:
    report = run("ppo_clip", f"{impl}:token_mean")
    (p,) = report.parity
    assert p.passed and report.passed
    assert p.grad_norm_ratio == pytest.approx(1.0, abs=1e-5)
    # float32 operands: the two orders of evaluation differ by ~1e-7 relative
    assert p.coefficient_rel is not None and p.coefficient_rel < 1e-5
    assert p.findings == []


def test_built_in_pairs() -> None:
    # grpo with β = 0 is ppo_clip; gspo and gspo_token agree when A is per sequence (synthetic)
    assert run("ppo_clip", "grpo", loss={"kl_coef": 0.0}).parity[0].passed
    assert run("gspo", "gspo_token").parity[0].passed
    # CISPO keeps the tokens PPO-clip drops: parity fails and says a rule differs
    p = run("ppo_clip", "cispo").parity[0]
    assert not p.passed
    assert any("a clip or mask rule differs" in f for f in p.findings)


def test_the_two_cispo_parametrisations_differ_unless_matched() -> None:
    # relative bounds (1 − 10, 1 + 0.28) vs an absolute cap 5 (trap A5) ...
    p = run("cispo", "cispo_cap").parity[0]
    assert not p.passed
    # ... agree once the cap equals 1 + eps_high and the lower bound is off
    p = run("cispo", "cispo_cap", loss={"cispo_cap": 1.28}).parity[0]
    assert p.passed


def parity(batch, view, a, b, tolerance):
    inputs = materialized_inputs(batch, view, a, b, LossParams(), Aggregation())
    return build_parity(batch, view.logp, inputs, Aggregation(), tolerance)


def test_parity_is_pure_and_tolerance_driven() -> None:
    batch = random_batch(3, n=6, t=5, v=11, h=5, drift=0.6)
    view = softmax_view(batch)
    a, b = get_loss("ppo"), get_loss("ppo_clip")
    strict = parity(batch, view, a, b, 1e-9)
    assert not strict.passed and strict.coefficient_rel is not None
    loose = parity(batch, view, a, b, strict.coefficient_rel)
    assert loose.passed  # the tolerance is what decides
    same = parity(batch, view, a, a, 1e-12)
    assert same.passed and same.coefficient_max_abs_diff == 0.0 and same.top == []


@pytest.mark.slow
def test_cli_parity_check_exit_status_and_table(impl: str) -> None:
    args = ["compare", "--set", "source.vocab_size=64", "--check"]
    bad = runner.invoke(app, [*args, "--parity", f"ppo_clip,{impl}:token_sum"])
    assert bad.exit_code == 1
    assert "parity: ppo_clip (A)" in bad.stdout and "FAIL parity" in bad.stdout
    good = runner.invoke(app, [*args, "--parity", f"ppo_clip,{impl}:token_mean"])
    assert good.exit_code == 0, good.output
    three = runner.invoke(app, ["compare", "--parity", "a,b,c"])
    assert three.exit_code == 2 and "exactly two" in three.output
    unknown = runner.invoke(app, ["compare", "--parity", "ppo_clip,ppo_clp"])
    assert unknown.exit_code == 2 and "did you mean 'ppo_clip'" in unknown.output


def test_parity_tolerance_from_config(impl: str) -> None:
    report = run(
        "ppo_clip",
        f"{impl}:token_sum",
        parity={"pairs": [["ppo_clip", f"{impl}:token_sum"]], "tolerance": 1e6},
    )
    (p,) = report.parity
    assert p.tolerance == 1e6 and p.passed


def test_several_pairs_in_one_run(impl: str) -> None:
    args = ["compare", "--set", "source.vocab_size=64", "-f", "json"]
    pairs = ["--parity", f"ppo_clip,{impl}:token_mean", "--parity", f"ppo_clip,{impl}:token_sum"]
    result = runner.invoke(app, [*args, *pairs])
    assert result.exit_code == 0, result.output  # no --check: the report, whatever it says
    data = json.loads(result.stdout)
    assert [(p["a"]["name"], p["b"]["name"], p["passed"]) for p in data["parity"]] == [
        ("ppo_clip", f"{impl}:token_mean", True),
        ("ppo_clip", f"{impl}:token_sum", False),
    ]
    assert [c["passed"] for c in data["checks"] if c["name"] == "parity"] == [True, False]
    # without --losses, each of the pairs' losses runs once
    assert [r["name"] for r in data["losses"]] == [
        "ppo_clip",
        f"{impl}:token_mean",
        f"{impl}:token_sum",
    ]


@pytest.mark.slow
def test_a_parity_matrix_runs_the_pairs_under_each_setting(impl: str) -> None:
    # the user loss always averages over tokens: it agrees with ppo_clip under token_mean and
    # differs per sequence under seq_mean_token_mean, which the matrix names
    args = ["compare", "--set", "source.vocab_size=64", "--parity", f"ppo_clip,{impl}:token_mean"]
    grid = ["--parity-matrix", "loss.aggregation=[token_mean, seq_mean_token_mean]"]
    table = runner.invoke(app, [*args, *grid, "--check"])
    assert table.exit_code == 1
    assert "parity matrix" in table.stdout and "1/2 settings passed every check" in table.stdout
    result = runner.invoke(app, [*args, *grid, "-f", "json"])
    data = json.loads(result.stdout)
    assert data["schema_version"] == "gradlens.parity-matrix/1"
    first, second = data["entries"]
    assert first["settings"] == {"loss.aggregation": "token_mean"} and first["passed"]
    assert second["settings"] == {"loss.aggregation": "seq_mean_token_mean"}
    (p,) = second["parity"]
    assert not p["passed"]
    assert any(
        "B'·|y_i|/N_tok" in f and "seq_mean_token_mean (A) vs token_mean (B)" in f
        for f in p["findings"]
    )
    bad = runner.invoke(app, [*args, "--parity-matrix", "loss.aggregation=token_mean"])
    assert bad.exit_code == 2 and "YAML list" in bad.output


# ----------------------------------------------------------------------------- metric names


def resolve(data: Any, key: str) -> bool:
    """Does the JSON path ``key`` (``losses[]`` = any entry) exist in ``data``?"""
    node: list[Any] = [data]
    for part in key.split("."):
        many = part.endswith("[]")
        part = part.removesuffix("[]")
        node = [n[part] for n in node if isinstance(n, dict) and part in n]
        if many:
            node = [x for n in node for x in n]
    return bool(node)


@pytest.mark.slow
def test_every_metric_name_points_at_a_key_of_the_report() -> None:
    config = validate(
        {
            "losses": ["ppo_clip", "grpo", "gspo", "cispo", "cispo_cap"],
            "source": {"vocab_size": 64, "rollout_drift": 0.1, "ref_drift": 0.3},
            "loss": {
                "dual_clip": 3.0,
                "opsm_delta": 0.01,
                "corrections": [{"kind": "token_tis"}, {"kind": "geo_mask"}],
            },
        }
    )
    result = runner.invoke(
        app, ["compare", "-f", "json", "--set", "source.vocab_size=64"]
    )  # default run: the crosswalk is always there
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)["metric_names"]) == len(METRIC_NAMES)
    data = json.loads(run_compare(config).model_dump_json())
    for row in data["metric_names"]:
        assert resolve(data, row["key"]), row["key"]


def test_the_crosswalk_records_where_frameworks_disagree() -> None:
    by_key = {m.key: m for m in METRIC_NAMES}
    dual, lower = by_key["losses[].clipping.dual"], by_key["losses[].clipping.lower"]
    assert dual.verl == "actor/pg_clipfrac_lower" and dual.trl is None  # A4
    assert lower.trl == "clip_ratio/low_mean" and "pg_clipfrac_lower" in (lower.note or "")
    assert "A5" in (by_key["losses[].clipping.shares.weight_clipped"].note or "")
    assert "A7" in (by_key["losses[].clipping.region"].note or "")
    region = by_key["losses[].clipping.region"]
    assert (region.verl, region.trl, region.openrlhf, region.slime) == (
        "actor/pg_clipfrac",
        "clip_ratio/region_mean",
        "ppo_clip_ratio",
        "pg_clipfrac",
    )


def test_losses_command_lists_the_policy_losses_with_their_maths() -> None:
    data = json.loads(runner.invoke(app, ["losses", "--format", "json"]).stdout)
    rows = {row["name"]: row for row in data["losses"]}
    assert set(rows) == set(loss_names())
    for name in ("grpo", "gspo", "gspo_token", "cispo", "cispo_cap", "sapo", "minirl"):
        assert rows[name]["formula"] and rows[name]["per_token_grad"] and rows[name]["paper"]
        assert "arXiv" in rows[name]["paper"] or "TRL" in rows[name]["paper"]
