"""Every report reads at 80 and 120 columns: no number or word split across lines, none cut.

Each report is rendered twice: at an unbounded width, where nothing wraps, and at the width
under test. Read as text with the box-drawing characters blanked, the narrow rendering must
hold every word of the unbounded one at least as often (a folded number becomes two pieces, a
truncated one ends in '…': either way the whole word goes missing), and no line may be wider
than the console.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from gradlens.compare import run_compare
from gradlens.config import build_config
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.frameworks import framework_rows
from gradlens.report.loss_list import (
    aggregation_table,
    framework_table,
    loss_list_table,
    pair_table,
)
from gradlens.report.mismatch_table import mismatch_parts
from gradlens.report.support_table import support_table
from gradlens.report.sweep_table import render_sweep
from gradlens.report.table import render_compare
from gradlens.report.trace import trace_renderable
from gradlens.results import CompareReport
from gradlens.sweep import build_sweep_config, run_sweep
from gradlens.sweep.pair import compare_pair
from gradlens.trace.run import trace_run
from tests.compare.test_golden_reports import upgrade  # the recorded reports in today's schema

TESTS = Path(__file__).resolve().parents[1]
CONFIGS = TESTS.parent / "configs"

BOX = re.compile("[\u2500-\u257f]")  # box drawing; not the sparkline's block elements
UNBOUNDED = 100_000
WIDTHS = [80, 120]

Draw = Callable[[Console], None]


def render(draw: Draw, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    draw(console)
    return console.export_text()


def words(text: str) -> Counter[str]:
    return Counter(BOX.sub(" ", text).split())


def assert_readable(draw: Draw, width: int) -> None:
    whole = words(render(draw, UNBOUNDED))
    text = render(draw, width)
    widest = max(cell_len(line) for line in text.splitlines())
    assert widest <= width, f"a line of {widest} characters at {width} columns"
    missing = whole - words(text)
    assert not missing, f"split or cut at {width} columns: {sorted(missing)[:20]}"


def golden_report(path: Path) -> CompareReport:
    data = upgrade(json.loads(path.read_text()))
    data["schema_version"] = CompareReport.model_fields["schema_version"].default
    return CompareReport.model_validate(data)


GOLDEN_COMPARE = sorted(
    p for p in (TESTS / "golden").glob("*.json") if "check" not in json.loads(p.read_text())
)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(
    "path",
    # the hand-written reports in the fast subset, the larger ones slow (tests/conftest.py)
    [
        pytest.param(
            p, id=p.stem, marks=[] if p.stem.startswith("literal_") else [pytest.mark.slow]
        )
        for p in GOLDEN_COMPARE
    ],
)
def test_compare_report_reads_at_the_width(path: Path, width: int) -> None:
    report = golden_report(path)
    assert_readable(lambda console: render_compare(report, console), width)


SWEEPS = {
    "default": ([], []),
    "over": ([], ["loss.dual_clip=null,3", "loss.eps_high=0.2,0.28"]),
    **{p.stem: ([p], []) for p in sorted(CONFIGS.glob("sweep_*.yaml"))},
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(SWEEPS))
def test_sweep_table_reads_at_the_width(name: str, width: int) -> None:
    paths, overs = SWEEPS[name]
    outcome = run_sweep(build_sweep_config(paths[0] if paths else None, [], overs))
    assert_readable(lambda console: render_sweep(outcome, console), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_loss_list_reads_at_the_width(width: int) -> None:
    table = loss_list_table([get_loss(n) for n in loss_names()])
    assert_readable(lambda console: console.print(table), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_aggregation_and_framework_lists_read_at_the_width(width: int) -> None:
    aggregations = [
        {"name": name, "loss": mode.formula, "used_by": mode.used_by}
        for name, mode in AGGREGATIONS.items()
    ]
    tables = [aggregation_table(aggregations), framework_table(framework_rows())]
    assert_readable(lambda console: [console.print(t) for t in tables], width)


@pytest.mark.parametrize("width", WIDTHS)
def test_trace_reads_at_the_width(width: int) -> None:
    trace = trace_run(str(TESTS.parent / "docs" / "examples" / "trl_run"))
    assert trace.spikes  # the example run has a spike: its contributors' tables are drawn too
    assert_readable(lambda console: console.print(trace_renderable(trace)), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_loss_pair_reads_at_the_width(width: int) -> None:
    table = pair_table(compare_pair("ppo_clip", "cispo", LossParams(), Aggregation()))
    assert_readable(lambda console: console.print(table), width)


@pytest.fixture(scope="module")
def kept_sets_report() -> CompareReport:
    """A built-in model run sampled with top-k: its report has the sampling-support section."""
    overrides = [
        "source.kind=model",
        "source.num_prompts=1",
        "source.group_size=2",
        "source.max_new_tokens=4",
        "source.stale.steps=0",
        "source.top_k=20",
    ]
    return run_compare(build_config(None, overrides))


@pytest.mark.parametrize("width", WIDTHS)
def test_support_section_reads_at_the_width(kept_sets_report: CompareReport, width: int) -> None:
    assert kept_sets_report.support is not None
    assert_readable(lambda console: console.print(support_table(kept_sets_report)), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_mismatch_section_reads_at_the_width(kept_sets_report: CompareReport, width: int) -> None:
    """The gap's statistics, buckets, worst tokens (decoded) and the corrections' table."""
    parts = mismatch_parts(kept_sets_report)
    assert parts is not None and kept_sets_report.mismatch is not None
    assert kept_sets_report.mismatch.worst[0].context is not None
    assert_readable(lambda console: console.print(parts), width)


def test_a_split_number_is_caught():
    """The check itself: a rich table that folds its numbers (as before) fails it."""
    from rich.table import Table

    def draw(console: Console) -> None:
        table = Table()
        for name in ("mean", "min", "p01", "p05", "p50", "p95", "p99", "max", "KL k1", "KL k3"):
            table.add_column(name, overflow="fold")
        table.add_row(*["0.03072"] * 10)
        console.print(table)

    with pytest.raises(AssertionError, match="split or cut"):
        assert_readable(draw, 80)
