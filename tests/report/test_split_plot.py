"""``gradlens compare --split … --plot``: the split figure (gradlens.report.plots.plot_split).

The figure's pixels are not asserted; the tests check that a valid PNG is written for each
convention and for several side by side, that the report's per-sequence factors it draws are
the micro-batches' ones, and what happens with a split that splits nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gradlens.cli import app

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
# a small built-in batch: 8 sequences, so that a run takes a moment
SMALL = ["--set", "source.num_sequences=8", "--losses", "reinforce"]


def _compare(*args: str):
    return runner.invoke(app, ["compare", *SMALL, *args])


@pytest.mark.parametrize(
    "convention",
    [
        "verl",
        *(
            pytest.param(c, marks=pytest.mark.slow)
            for c in ("verl_legacy", "trl:bnpo", "openrlhf", "ms_swift")
        ),
    ],
)
def test_the_split_figure_is_a_png_for_each_convention(convention, tmp_path):
    path = tmp_path / "split.png"
    result = _compare(
        "--split", "micro=2,dp=2,ga=2", "--convention", convention, "--plot", str(path)
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_several_conventions_are_drawn_side_by_side(tmp_path):
    path = tmp_path / "split.png"
    result = _compare(
        "--split", "micro=2,dp=2,ga=2", "--convention", "trl:bnpo,verl", "--plot", str(path),
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(PNG)
    assert '"convention": "trl"' in result.stdout  # the report is the first convention's


@pytest.mark.slow
def test_the_report_has_each_sequence_with_its_micro_batch_factor(tmp_path):
    result = _compare("--split", "micro=2,dp=2,ga=2", "--convention", "trl:bnpo", "-f", "json")
    assert result.exit_code == 0, result.output
    split = json.loads(result.stdout)["split"]
    rows = split["sequences"]
    assert [s["row"] for s in rows] == list(range(8))
    for m in split["micro_batches"]:
        mine = [s for s in rows if s["micro_batch"] == m["index"]]
        assert [s["row"] for s in mine] == list(range(*m["rows"]))
        assert sum(s["tokens"] for s in mine) == m["tokens"]
        # bnpo: one factor per micro-batch, N_tok/(dp·ga·N_j), the same for its sequences
        for s in mine:
            assert s["weight_ratio"] == pytest.approx(m["weight_ratio_min"], rel=1e-12)


@pytest.mark.slow
def test_a_split_into_one_micro_batch_draws_every_factor_one(tmp_path):
    # micro = B, dp = ga = 1: one micro-batch holds the whole batch, so w_split = w_full for
    # every convention; the figure is drawn (its title says nothing is split)
    path = tmp_path / "split.png"
    result = _compare(
        "--split", "micro=8", "--convention", "trl:bnpo", "--plot", str(path), "-f", "json"
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(PNG)
    assert '"invariant": true' in result.stdout


def test_several_conventions_without_plot_is_a_clear_error(tmp_path):
    result = _compare("--split", "micro=2,dp=2,ga=2", "--convention", "trl:bnpo,verl")
    assert result.exit_code == 2
    assert "--convention" in result.stderr and "--plot" in result.stderr


@pytest.mark.slow
def test_plot_without_split_still_draws_the_attribution(tmp_path):
    path = tmp_path / "attribution.png"
    result = _compare("--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(PNG)
