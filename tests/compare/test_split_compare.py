"""``--split`` end to end: the config section, the CLI options, the report and its check."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradlens import sources
from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.config import build_config, parse_split
from gradlens.errors import GradlensError
from gradlens.results import CompareReport

runner = CliRunner()
SMALL = [  # 8 sequences, a small vocabulary: quick
    "source.num_sequences=8",
    "source.vocab_size=64",
    "source.hidden_size=16",
    "source.max_length=24",
]


def run(convention: str, losses: str = "reinforce,ppo_clip") -> CompareReport:
    flags = {**parse_split("micro=2,dp=2,ga=2"), "split.convention": convention}
    flags["losses"] = losses.split(",")
    return run_compare(build_config(None, SMALL, flags))


@pytest.mark.slow
def test_invariant_convention_passes_and_local_one_fails() -> None:
    ok = run("verl")
    assert ok.split is not None and ok.split.invariant and ok.passed
    assert [c.passed for c in ok.checks if c.name == "split"] == [True, True]
    # the full-batch gradient of the split section is the report's own ‖∂L/∂W‖ (token_mean)
    for loss, s in zip(ok.losses, ok.split.losses, strict=True):
        assert s.grad_norm_full == pytest.approx(loss.rows.total_norm, rel=1e-5)
    bad = run("trl:bnpo")
    failed = [c for c in bad.checks if not c.passed]
    assert [c.name for c in failed] == ["split", "split"] and not bad.passed
    assert "long-sequence micro-batches are down-weighted" in failed[0].detail


def test_config_errors_name_the_field() -> None:
    with pytest.raises(GradlensError, match=r"split\.convention: unknown convention 'trk'"):
        build_config(None, ["split.micro=4", "split.convention=trk"])
    with pytest.raises(GradlensError, match=r"split\.convention: unknown trl setting 'bnp'"):
        build_config(None, ["split.micro=4", "split.convention=trl:bnp"])
    with pytest.raises(GradlensError, match=r"split\.micro: .*greater than or equal to 1"):
        build_config(None, ["split.micro=0", "split.convention=verl"])
    with pytest.raises(
        GradlensError, match=r"split\.convention: required, and not given: the framework.s table"
    ):
        build_config(None, ["split.micro=4"])
    with pytest.raises(GradlensError, match=r"micro·dp·ga = 3·1·1 = 3 sequences"):
        run_compare(build_config(None, [*SMALL, "split.micro=3", "split.convention=verl"]))


@pytest.mark.parametrize("kind", ["model", "synthetic"])
def test_a_split_that_does_not_cut_the_batch_is_refused_before_the_source_builds_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the model source's 16 sequences are known from its settings: refused before the
    # checkpoint loads and samples (20 s on a 135M model), not after
    def never(*args: object) -> None:
        raise AssertionError("the source was built")

    plan = sources.SOURCES[kind].plan
    monkeypatch.setitem(sources.SOURCES, kind, sources.SourceKind(never, plan))
    config = build_config(
        None, [f"source.kind={kind}", "split.micro=4", "split.dp=2", "split.convention=verl"]
    )
    with pytest.raises(GradlensError, match=r"micro·dp·ga = 4·2·1 = 8 sequences, but the batch"):
        run_compare(config)


def test_cli_split_and_check() -> None:
    args = ["compare", "--losses", "reinforce", *[a for s in SMALL for a in ("--set", s)]]
    result = runner.invoke(
        app, [*args, "--split", "micro=2,dp=2,ga=2", "--convention", "ms_swift", "--check"]
    )
    assert result.exit_code == 1, result.output
    assert "effective learning rate is ∝ 1/ga" in result.output
    result = runner.invoke(app, [*args, "--split", "micro=2,gpus=4", "--convention", "verl"])
    assert result.exit_code == 2
    assert "each part is micro=N, dp=N or ga=N" in result.output
    # a part given twice: the last one won silently
    result = runner.invoke(app, [*args, "--split", "micro=2,dp=2,micro=4", "--convention", "verl"])
    assert result.exit_code == 2
    assert "micro is given twice" in result.output


@pytest.mark.parametrize(
    ("losses", "overrides"),
    [("aspo", []), ("ppo_clip", ["loss.top_entropy_quantile=0.2"])],
    ids=["aspo", "top-entropy-selection"],
)
def test_losses_that_read_the_entropy_split_as_the_others_do(losses, overrides) -> None:
    # aspo's widths and the top-entropy selection read H_t: the split hands them the run's
    flags = {**parse_split("micro=2,dp=2,ga=2"), "split.convention": "verl"}
    report = run_compare(build_config(None, [*SMALL, *overrides], {**flags, "losses": [losses]}))
    assert report.split is not None and report.split.invariant and report.passed
    (loss,) = report.split.losses
    # the full-batch gradient of the split section is the report's own ‖∂L/∂W‖
    assert loss.grad_norm_full == pytest.approx(report.losses[0].rows.total_norm, rel=1e-5)
