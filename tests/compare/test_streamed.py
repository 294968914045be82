"""`gradlens compare` through the streamed engine reports what the materialized path reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.config import build_config

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# Both engines on the synthetic default batch take seconds per config: slow, but literal_tc.
SLOW = pytest.mark.slow
CONFIGS = [
    pytest.param("default.yaml", marks=SLOW),
    pytest.param("deepseek_opsm.yaml", marks=SLOW),
    pytest.param("dr_grpo.yaml", marks=SLOW),
    pytest.param("on_policy.yaml", marks=SLOW),
    "literal_tc.yaml",
    pytest.param("peaked_bf16.yaml", marks=SLOW),
]
# Relative agreement of the two paths, per operand dtype: they differ in the order of the
# logits GEMM (chunked vs whole) and of every sum over the vocabulary. float64: a few hundred
# ulps; float32: |z| ≲ 60 gives logits ~4e-6 apart, which r = e^(ℓ − ℓ_old) carries into c_t;
# bf16 operands: the dense product is a bf16 GEMM in the engine and float32 in the
# materialized path, 2·2⁻⁸.
TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 1e-2}


def both(config_name: str, overrides: tuple[str, ...] = ()):
    path = REPO / "configs" / config_name
    reports = [
        run_compare(
            build_config(
                path,
                [
                    f"diagnostics.engine={engine}",
                    "diagnostics.reference=autograd",
                    "diagnostics.attribution=on",
                    *overrides,
                ],
            )
        )
        for engine in ("materialized", "streamed")
    ]
    return reports


@pytest.mark.parametrize("config_name", CONFIGS)
def test_streamed_and_materialized_reports_agree(config_name):
    assert_agree(*both(config_name))


ENTROPY_CASES = [
    ("default.yaml", ("loss.entropy_coef=0.01",)),
    ("default.yaml", ("loss.entropy_coef=0.1",)),
    ("dr_grpo.yaml", ("loss.entropy_coef=0.01",)),
    ("dr_grpo.yaml", ("loss.entropy_coef=0.1",)),
    ("default.yaml", ("loss.entropy_coef=0.1", "dtype=float64")),  # TOL: 1e-10
    ("dr_grpo.yaml", ("loss.entropy_coef=0.01", "dtype=float64")),
    ("peaked_bf16.yaml", ("loss.entropy_coef=0.1",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config_name", "overrides"), ENTROPY_CASES)
def test_streamed_entropy_bonus_agrees_with_materialized(config_name, overrides):
    """The bonus's non-c-form gradient a_t·c_H·π(log π + H) on the streamed engine: the same
    rows, sampled-row numbers, loss, zero-sum verdict and agreement with autograd."""
    mat, stream = both(config_name, overrides)
    assert_agree(mat, stream)
    plain = run_compare(
        build_config(
            REPO / "configs" / config_name,
            ["diagnostics.engine=streamed", *[o for o in overrides if "entropy" not in o]],
        )
    )
    tol = TOL[mat.environment.dtype]
    for a, b, p in zip(mat.losses, stream.losses, plain.losses, strict=True):
        assert "entropy bonus excluded" in b.sampled_row.post_formula
        assert b.sampled_row.post_formula == a.sampled_row.post_formula
        assert b.findings == a.findings and any("entropy bonus" in f for f in b.findings)
        assert b.sampled_row.sampled_abs_max == pytest.approx(
            a.sampled_row.sampled_abs_max, rel=tol
        )
        assert b.sampled_row.post_max_rel_err is not None
        assert b.sampled_row.post_max_rel_err <= 100 * tol  # the policy term: the post's formula
        assert b.loss != pytest.approx(p.loss, rel=1e-6)  # the bonus is in: −c_H·Σ a_t H_t
        assert b.rows.total_norm != pytest.approx(p.rows.total_norm, rel=1e-6)


# The losses of docs/losses.md §2.14–§2.28 on both engines, with rollout log-probs (prime_*,
# m2po, vespo, rollout_*) and prompt groups (real) from the synthetic source; aspo and the
# top-entropy selection read the per-token entropy, which the streamed engine accumulates in its
# first pass.
SMALL = ("source.vocab_size=256", "source.rollout_drift=0.1")
POLICY_LOSS_CASES = [
    ("losses=[dppo_tv, dppo_kl, prime_rl, prime_ipo, m2po, aspo, ce_gppo]", "dtype=float64"),
    ("losses=[gppo, clip_cov, kl_cov, gmpo, topr, dro, luspo]", "dtype=float64"),
    ("losses=[vespo, real, fipo, rollout_is, cispo_rollout, dft, chord]", "dtype=float64"),
    ("losses=[aspo, real, fipo, m2po]",),  # float32
    (
        "losses=[ppo_clip, gspo, grpo, aspo, kl_cov]",
        "loss.top_entropy_quantile=0.2",
        "loss.entropy_coef=0.01",
        "dtype=float64",
    ),
    # float32: not vespo, whose weight exp(Σ_t log r) sums the two paths' ~1e-6 differences
    # of ℓ over a whole sequence (up to 64 tokens here): ~1e-5, above assert_agree's 1e-5 for
    # float32 row norms (still within gradlens's float32 tolerance 1e-4); not prime_*, whose
    # c = 2τ(ℓ − ℓ_μ) on a token with π(y) ≈ 1 and ℓ_μ = 0 is exactly 0 on the streamed path
    # (z_y − lse = 0) and −4e-13 on the materialized one (log_softmax gives −1.2e-7): zero_grad
    # differs by such tokens
    ("losses=[ppo_clip, dppo_tv, cispo_rollout]", "loss.top_entropy_quantile=0.3"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", POLICY_LOSS_CASES)
def test_streamed_and_materialized_agree_on_trust_region_and_reweighted_losses(overrides):
    mat, stream = both("default.yaml", (*SMALL, *overrides))
    assert_agree(mat, stream)
    if any("top_entropy" in o for o in overrides):
        for r in stream.losses:
            assert 0 < r.clipping.shares["entropy_masked"] < 1, r.name


def assert_agree(mat, stream):
    assert mat.engine is not None and mat.engine.path == "materialized"
    assert stream.engine is not None and stream.engine.path == "streamed"
    tol = TOL[mat.environment.dtype]
    assert stream.passed and mat.passed
    assert stream.batch.num_tokens == mat.batch.num_tokens
    for a, b in zip(mat.losses, stream.losses, strict=True):
        assert a.name == b.name
        assert b.agreement.ran and b.agreement.passed, b.agreement
        if mat.environment.dtype == "float32":
            # the streamed row norms against autograd's, in float32: within 1e-5 (normwise)
            assert b.agreement.grad_weight is not None and b.agreement.grad_weight < 1e-5
        assert b.zero_sum.passed
        assert b.rows.total_norm == pytest.approx(a.rows.total_norm, rel=tol)
        assert b.sampled_row.sampled_abs_mean == pytest.approx(
            a.sampled_row.sampled_abs_mean, rel=tol
        )
        assert b.sampled_row.other_mass_mean == pytest.approx(
            a.sampled_row.other_mass_mean, rel=tol
        )
        assert b.sampled_row.other_abs_max == pytest.approx(a.sampled_row.other_abs_max, rel=tol)
        assert b.loss == pytest.approx(a.loss, rel=tol, abs=1e-12)
        assert b.clipping == a.clipping
        assert [r.token for r in b.rows.top_rows[:3]] == [r.token for r in a.rows.top_rows[:3]]
        assert b.metrics.keys() == a.metrics.keys()
        for name, value in a.metrics.items():
            assert b.metrics[name] == pytest.approx(value, rel=tol, abs=1e-12), name
        assert_attribution_agrees(a.attribution, b.attribution, tol)


def assert_attribution_agrees(a, b, tol: float) -> None:
    """The attribution sections: shares to ``tol`` (they are fractions of 1), the entropy
    rates to ``tol`` against the size of their parts (the mean cancels between signs)."""
    assert (a is None) == (b is None)
    if a is None:
        return
    assert b.grad_norm_sq == pytest.approx(a.grad_norm_sq, rel=2 * tol)
    assert b.share_sum == pytest.approx(1.0, abs=tol) and a.share_sum == pytest.approx(1.0, abs=tol)
    # π_θ(y) differs by up to tol (relative) between the engines: a token that close to a
    # bucket edge may change bucket, taking its share along
    edges = (0.1, 0.5, 0.9)
    near = [
        abs(x or 0.0)
        for p, x in zip(a.points.prob, a.points.share, strict=True)
        if p is not None and any(abs(p - e) <= tol * e for e in edges)
    ]
    assert a.points.total == len(a.points.prob)  # every token is a point here
    for group, part in a.groups.items():
        moved = (len(near), sum(near)) if group == "prob_bucket" else (0, 0.0)
        for key, count in part.tokens.items():
            assert abs(b.groups[group].tokens[key] - count) <= moved[0], (group, key)
        for key, value in part.shares.items():
            got = b.groups[group].shares[key]
            assert got == pytest.approx(value, abs=tol + moved[1]), (group, key)
    for x, y in zip(a.top_sequences, b.top_sequences, strict=True):
        assert y.share == pytest.approx(x.share, abs=tol)
        assert y.norm == pytest.approx(x.norm, rel=10 * tol)
    for field in ("lm_head", "logit"):
        parts = getattr(a.entropy, f"{field}_by_sign").values()
        scale = sum(abs(v) for v in parts if v is not None)
        value = getattr(a.entropy, field)
        assert getattr(b.entropy, field) == pytest.approx(value, abs=10 * tol * scale), field


@pytest.mark.slow
def test_streamed_reports_carry_the_loss_metrics():
    """grpo's KL term (verl actor/kl_loss) is reported by both engines, with the same value."""
    overrides = ["losses=[grpo, ppo_clip]", "loss.kl_coef=0.1", "loss.kl_estimator=k3"]
    mat, stream = (
        run_compare(build_config(None, [*overrides, f"diagnostics.engine={engine}"]))
        for engine in ("materialized", "streamed")
    )
    kl_mat, kl_stream = mat.losses[0].metrics["kl"], stream.losses[0].metrics["kl"]
    assert kl_mat is not None and kl_mat > 0.0
    assert kl_stream == pytest.approx(kl_mat, rel=1e-4)  # float32: TOL above
    assert stream.losses[1].metrics == {} == mat.losses[1].metrics


@pytest.mark.slow
def test_auto_streams_large_batches():
    overrides = ["source.vocab_size=256", "diagnostics.stream_above=1000"]
    report = run_compare(build_config(None, overrides))
    assert report.engine is not None and report.engine.path == "streamed"
    assert "> 1000" in report.engine.reason
    # auto reference with the streamed engine: the sampled check (no [M, V] under autograd)
    assert all(r.agreement.ran and r.agreement.scope == "sampled" for r in report.losses)
    assert "agreement" in {c.name for c in report.checks}
    assert report.passed


@pytest.mark.slow
def test_streamed_engine_runs_the_entropy_bonus():
    result = runner.invoke(
        app, ["compare", "--engine", "streamed", "--set", "loss.entropy_coef=0.01"]
    )
    assert result.exit_code == 0, result.stderr
    # auto streams large batches with the bonus too
    overrides = ["loss.entropy_coef=0.01", "diagnostics.stream_above=1000"]
    report = run_compare(build_config(None, overrides))
    assert report.engine is not None and report.engine.path == "streamed"
    assert report.passed


@pytest.mark.slow
def test_reference_none_is_reported_as_not_run():
    result = runner.invoke(app, ["compare", "--reference", "none", "-l", "reinforce"])
    assert result.exit_code == 0
    assert "not run" in result.stdout
    data = json.loads(
        runner.invoke(
            app, ["compare", "--reference", "none", "-l", "reinforce", "-f", "json"]
        ).stdout
    )
    assert data["losses"][0]["agreement"]["ran"] is False


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        (),
        # pass 1's H_t for aspo and the top-entropy selection, and the bonus weighted by S_t
        ("losses=[ppo_clip, aspo]", "loss.top_entropy_quantile=0.3", "loss.entropy_coef=0.01"),
    ],
    ids=["default", "top-entropy-selection"],
)
def test_the_fused_engine_gives_the_streamed_report(settings) -> None:
    """``--engine fused`` (Triton kernels, here under Triton's interpreter) is the same engine:
    the same report as ``streamed`` to float32 rounding."""
    pytest.importorskip("triton")
    small = [
        "source.vocab_size=300",
        "source.num_sequences=4",
        "source.min_length=4",
        "source.max_length=8",
        "diagnostics.vocab_chunk=128",
        *settings,
    ]
    reports = {
        e: run_compare(build_config(None, [*small, f"diagnostics.engine={e}"]))
        for e in ("streamed", "fused")
    }
    fused, streamed = reports["fused"], reports["streamed"]
    assert fused.engine is not None and fused.engine.path == "fused"
    assert fused.passed
    for a, b in zip(fused.losses, streamed.losses, strict=True):
        assert a.rows.total_norm == pytest.approx(b.rows.total_norm, rel=1e-5)
        assert a.sampled_row.sampled_abs_max == pytest.approx(
            b.sampled_row.sampled_abs_max, rel=1e-5
        )
        assert [r.token for r in a.rows.top_rows] == [r.token for r in b.rows.top_rows]
        assert a.clipping == b.clipping
