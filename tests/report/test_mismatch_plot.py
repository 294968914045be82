"""The mismatch figure: the histogram holds every token, the thresholds are drawn or named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from gradlens.compare import run_compare
from gradlens.config import build_config
from gradlens.errors import GradlensError
from gradlens.report.mismatch_plot import mismatch_figure, plot_mismatch
from gradlens.results import CompareReport

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def report() -> CompareReport:
    """The synthetic three-policy batch (rollout noise 0.1 on the logits), token TIS ≤ 2."""
    return run_compare(
        build_config(CONFIGS / "train_inference_mismatch.yaml", ["losses=[ppo_clip]"])
    )


def test_histogram_counts_every_token(report: CompareReport) -> None:
    m = report.mismatch
    assert m is not None and m.histogram is not None
    assert sum(map(sum, m.histogram.counts)) == m.statistics.count == report.batch.num_tokens


def test_lines_inside_the_axis_are_drawn_and_the_others_named(report: CompareReport) -> None:
    m = report.mismatch
    assert m is not None and m.histogram is not None
    low, high = m.histogram.y_edges[0], m.histogram.y_edges[-1]
    fig = mismatch_figure(report)
    left = fig.axes[0]
    drawn = {round(line.get_ydata()[0], 12) for line in left.get_lines()}
    text = " ".join(t.get_text() for t in left.texts)
    for line in m.thresholds:
        if low <= line.log_rho <= high:
            assert round(line.log_rho, 12) in drawn, line
        else:
            assert line.correction in text, line
    # the run's token TIS (cap 2) is a line at ln 2, drawn or named
    assert any(t.correction == "token_tis≤2" and t.log_rho == math.log(2) for t in m.thresholds)


def test_png_written(report: CompareReport, tmp_path: Path) -> None:
    path = tmp_path / "gap.png"
    plot_mismatch(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_rollout_is_an_error(report: CompareReport) -> None:
    with pytest.raises(GradlensError, match="rollout log-probs"):
        mismatch_figure(report.model_copy(update={"mismatch": None}))


@pytest.mark.slow
def test_the_cli_draws_it_and_names_its_option_in_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gradlens.cli import app

    runner = CliRunner()
    base = ["compare", "--set", "source.vocab_size=64", "--set", "source.rollout_drift=0.1"]
    path = tmp_path / "gap.png"
    done = runner.invoke(app, [*base, "--plot-mismatch", str(path)])
    assert done.exit_code == 0, done.output
    assert path.read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, [*base, "--plot-mismatch", str(tmp_path / "gap.txt")])
    assert bad.exit_code != 0 and "--plot-mismatch" in bad.output
    # no rollout log-probs: nothing to draw, said in words
    none = runner.invoke(app, ["compare", "--plot-mismatch", str(tmp_path / "none.png")])
    assert none.exit_code != 0 and "rollout log-probs" in none.output
