"""``--parity A,B`` on the streamed engine reports what the materialized path reports.

The streamed path never forms ∂L/∂z [M, V] or ∂L/∂W [V, H]: ‖∂L/∂W‖ and the row norms of A and
B come from the engine, the row difference from one more coefficient set c_B − c_A, and the
logit-gradient gap from c_A, c_B and per-token statistics (`gradlens.compare.parity.streamed_gap`).
Each pair below is run through both engines on the same synthetic batch and the two parity
reports are compared field by field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from helpers import IMPLEMENTATIONS

import gradlens.compare.materialized as materialized_module
import gradlens.compare.parity as parity_module
from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.results import CompareReport, ParityReport

# Relative agreement of the two engines. float64: only the order of the sums over the
# vocabulary (chunked logsumexp, the dense GEMM per chunk) differs, a few hundred ulps.
# float32: the chunked logsumexp moves ℓ_t by ~1e-6 and r = e^(ℓ − ℓ_old) carries that into
# c_t, and the row norms are float32 sums over ~600 tokens: 1e-4, as for the losses' own reports
# (test_compare_streamed.py).
TOL = {"float64": 1e-10, "float32": 1e-4}
SOURCE = {"vocab_size": 96, "hidden_size": 8, "num_sequences": 8, "max_length": 24}


@pytest.fixture(scope="module")
def impl(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("parity") / "impl.py"
    path.write_text(IMPLEMENTATIONS)
    return str(path)


def run(engine: str, dtype: str, a: str, b: str, **extra: Any) -> CompareReport:
    data = {
        "dtype": dtype,
        "losses": [a, b],
        "parity": {"pairs": [[a, b]]},
        "source": SOURCE,
        # small chunks, some resident: the streamed run makes several passes per vocabulary
        "diagnostics": {"engine": engine, "vocab_chunk": 32, "reference": "none"},
        **extra,
    }
    return run_compare(validate(data))


def both(dtype: str, a: str, b: str, **extra: Any) -> tuple[ParityReport, ParityReport, float]:
    """The two engines' parity reports, and max_t |c_t| of the pair."""
    mat, stream = (run(e, dtype, a, b, **extra) for e in ("materialized", "streamed"))
    assert mat.engine is not None and mat.engine.path == "materialized"
    assert stream.engine is not None and stream.engine.path == "streamed"
    assert len(mat.parity) == len(stream.parity) == 1
    c_scale = max(r.coefficient_abs_max or 0.0 for r in mat.losses)
    return mat.parity[0], stream.parity[0], c_scale


def close(actual: float | None, expected: float | None, rel: float, abs_: float = 0.0) -> bool:
    if actual is None or expected is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_)


def assert_same(m: ParityReport, s: ParityReport, rel: float, c_scale: float) -> None:
    """Field by field. Numbers that are rounding noise when the pair agrees (the differences
    of two equal coefficients or gradients) are compared absolutely against their scale;
    ``c_scale`` is max_t |c_t| of the pair."""
    assert (s.a.name, s.b.name, s.tolerance, s.passed) == (
        m.a.name,
        m.b.name,
        m.tolerance,
        m.passed,
    )
    assert s.differing_tokens == m.differing_tokens
    assert s.findings == m.findings
    loss_scale = max(abs(m.a.loss or 0.0), abs(m.b.loss or 0.0))
    for side_s, side_m in ((s.a, m.a), (s.b, m.b)):
        assert side_s.clipping == side_m.clipping
        assert close(side_s.loss, side_m.loss, rel, rel * loss_scale), (side_s.loss, side_m.loss)
        assert close(side_s.grad_norm, side_m.grad_norm, rel), (side_s.grad_norm, side_m.grad_norm)
        assert side_s.metrics.keys() == side_m.metrics.keys()
        for key, value in side_m.metrics.items():
            assert close(side_s.metrics[key], value, rel, rel * loss_scale), key
    assert close(s.grad_norm_ratio, m.grad_norm_ratio, rel)
    assert close(s.loss_diff, m.loss_diff, rel, rel * loss_scale)
    # normwise relative numbers: an agreeing pair's are rounding noise, so also absolutely
    for field in ("coefficient_rel", "grad_logits_rel", "row_max_rel"):
        assert close(getattr(s, field), getattr(m, field), rel, rel), field
    assert close(s.coefficient_max_abs_diff, m.coefficient_max_abs_diff, rel, rel * c_scale)
    if m.passed:  # where the pair agrees, the top positions are those of rounding noise
        assert all((p.abs_diff or 0.0) <= rel * c_scale for p in (*m.top, *s.top))
        return
    assert len(s.top) == len(m.top)
    for ps, pm in zip(s.top, m.top, strict=True):
        assert (ps.sequence, ps.position, ps.token) == (pm.sequence, pm.position, pm.token)
        assert close(ps.coefficient_a, pm.coefficient_a, rel, rel * c_scale)
        assert close(ps.coefficient_b, pm.coefficient_b, rel, rel * c_scale)
        assert close(ps.abs_diff, pm.abs_diff, rel, rel * c_scale)


PAIRS: list[tuple[str, str, dict[str, Any], str]] = [
    # (A, B, extra config, what the report must say)
    ("ppo_clip", "{impl}:token_sum", {}, "ratio c_B/c_A = N_tok"),  # a constant factor
    ("ppo_clip", "{impl}:no_is_weight", {}, "r_t^-1"),  # a missing importance weight
    ("ppo_clip", "cispo", {}, "a clip or mask rule differs"),  # a clip rule
    ("ppo", "ppo_clip", {"loss": {"eps_low": 0.1, "eps_high": 0.1}}, "clip or mask rule"),
    ("ppo_clip", "grpo", {"source": {**SOURCE, "ref_drift": 0.3}}, ""),  # + β·KL, a metric
    ("ppo_clip", "{impl}:token_mean", {}, "pass"),  # agree: a user loss against the built-in
    ("ppo_clip", "grpo", {"loss": {"kl_coef": 0.0}}, "pass"),  # agree: β = 0
    ("gspo", "gspo_token", {"loss": {"aggregation": "seq_mean_token_mean"}}, "pass"),
    # the entropy bonus: in each side's loss and ‖∂L/∂W‖, cancelling in the differences
    ("ppo", "ppo_clip", {"loss": {"eps_low": 0.1, "eps_high": 0.1, "entropy_coef": 0.1}}, "clip"),
    ("ppo_clip", "grpo", {"loss": {"kl_coef": 0.0, "entropy_coef": 0.1}}, "pass"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("a", "b", "extra", "expect"), PAIRS, ids=[f"{a}-{b.split(':')[-1]}" for a, b, *_ in PAIRS]
)
def test_streamed_parity_equals_materialized(
    impl: str, dtype: str, a: str, b: str, extra: dict[str, Any], expect: str
) -> None:
    m, s, c_scale = both(dtype, a.format(impl=impl), b.format(impl=impl), **extra)
    if expect == "pass":
        assert s.passed
    else:
        assert not s.passed and all(x is not None for x in (s.grad_logits_rel, s.row_max_rel))
        assert any(expect in f for f in s.findings), s.findings
    assert_same(m, s, TOL[dtype], c_scale)


def test_the_pair_need_not_be_among_the_losses() -> None:
    """A and B run in the engine beside the reported losses, without reports of their own."""
    reports = [
        run_compare(
            validate(
                {
                    "dtype": "float64",
                    "losses": ["reinforce"],
                    "parity": {"pairs": [["ppo", "ppo_clip"]]},
                    "source": SOURCE,
                    "diagnostics": {"engine": engine, "vocab_chunk": 32},
                }
            )
        )
        for engine in ("materialized", "streamed")
    ]
    mat, stream = reports
    assert [r.name for r in stream.losses] == ["reinforce"]
    assert stream.losses[0].rows.total_norm == pytest.approx(
        mat.losses[0].rows.total_norm, rel=1e-10
    )
    (p,), (s,) = mat.parity, stream.parity
    assert not s.passed
    assert p.coefficient_max_abs_diff and p.coefficient_rel
    assert_same(p, s, TOL["float64"], p.coefficient_max_abs_diff / p.coefficient_rel)


def test_streamed_parity_never_materialises_the_softmax(impl: str, monkeypatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("softmax_view called on the streamed path")

    monkeypatch.setattr(materialized_module, "softmax_view", refuse)
    monkeypatch.setattr(parity_module, "closed_form", refuse)
    report = run("streamed", "float32", "ppo_clip", f"{impl}:token_sum")
    assert len(report.parity) == 1 and not report.parity[0].passed
    assert [c.name for c in report.checks if not c.passed] == ["parity"]
    # the pair's difference is one more coefficient set: 1 logits GEMM (+ recomputed chunks)
    # and 3 dense ones (A, B, c_B − c_A)
    assert report.engine is not None and report.engine.gemm_equivalents is not None
    assert report.engine.gemm_equivalents >= 4.0 - 1e-9
    with pytest.raises(AssertionError, match="softmax_view"):
        run("materialized", "float32", "ppo_clip", f"{impl}:token_sum")


@pytest.mark.slow
def test_cli_parity_on_the_streamed_engine(impl: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gradlens.cli import app

    args = ["compare", "--engine", "streamed", "--set", "source.vocab_size=64", "--check"]
    bad = CliRunner().invoke(app, [*args, "--parity", f"ppo_clip,{impl}:token_sum"])
    assert bad.exit_code == 1 and "FAIL parity" in bad.stdout
    good = CliRunner().invoke(app, [*args, "--parity", f"ppo_clip,{impl}:token_mean"])
    assert good.exit_code == 0, good.output
