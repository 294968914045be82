"""``gradlens sweep``: each loss's sampled-row gradient across π_old(y) and π_θ(y).

stdout carries the report: the summary table, or — when ``--format`` is a data format or
``summary`` and no ``--output`` file is given — the records or the summary as JSON. Progress,
notes and errors go to stderr. A file named by ``--output`` appears only once complete.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from gradlens.cli.common import (
    EXIT_CHECK_FAILED,
    ConfigOption,
    DebugOption,
    output_file,
    set_option,
    stderr_console,
    stdout_console,
    stdout_errors,
    user_errors,
)
from gradlens.errors import GradlensError
from gradlens.files import check_distinct, check_output, writing

if TYPE_CHECKING:
    from rich.progress import Progress

    from gradlens.sweep import SweepOutcome

Tick = Callable[[int], None]

# Show a progress bar from this many records on (points × losses × variants × signs): the
# default sweep makes 2,408 and takes well under a second; a 2-D grid with a few --over values
# makes millions.
PROGRESS_FROM = 200_000


class SweepFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    summary = "summary"


class Vary(str, Enum):
    pi_old = "pi_old"
    pi_theta = "pi_theta"
    both = "both"


class Scale(str, Enum):
    log = "log"
    linear = "linear"


DATA_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}


def record_format(output_format: SweepFormat, output: Path | None) -> str | None:
    """What to write besides the table (a record format or 'summary'); None: the table only."""
    if output_format is not SweepFormat.table:
        return output_format.value
    if output is None:
        return None
    fmt = DATA_SUFFIXES.get(output.suffix.lower())
    if fmt is None:
        raise GradlensError(
            f"--output {str(output)!r}: say the format with --format json|jsonl|csv|summary, "
            f"or end the file name in {', '.join(DATA_SUFFIXES)}"
        )
    return fmt


def sweep(
    losses: Annotated[
        str | None,
        typer.Option(
            "--losses",
            "-l",
            help="Comma-separated loss names (see `gradlens losses`). "
            "Default: reinforce,ppo,ppo_clip,sft.",
        ),
    ] = None,
    config: ConfigOption = None,
    overrides: Annotated[
        list[str] | None,
        set_option("--set loss.dual_clip=3 --set pi_theta.fixed=0.2"),
    ] = None,
    over: Annotated[
        list[str] | None,
        typer.Option(
            "--over",
            metavar="KEY=V1,V2,...",
            help="Compare values of another setting on the same axes (repeatable; every "
            "combination is a variant), e.g. --over loss.eps_high=0.2,0.28,0.4 or "
            "--over loss.dual_clip=null,3. Any config key except those that define the grid.",
        ),
    ] = None,
    vary: Annotated[
        Vary | None,
        typer.Option(
            "--vary",
            help="What to sweep: pi_old (π_old(y) at a fixed π_θ(y); the default), pi_theta "
            "(π_θ(y) at a fixed π_old(y)) or both (a 2-D grid, drawn as heat maps).",
        ),
    ] = None,
    low: Annotated[
        float | None,
        typer.Option(
            "--min",
            help="Lowest probability swept, in (0, 1]; applies to both axes with --vary both. "
            "Default 1e-6.",
        ),
    ] = None,
    high: Annotated[
        float | None,
        typer.Option("--max", help="Highest probability swept, in (0, 1]. Default 1."),
    ] = None,
    points: Annotated[
        int | None,
        typer.Option("--points", "-n", help="Points per swept axis, ends included. Default 301."),
    ] = None,
    scale: Annotated[
        Scale | None,
        typer.Option("--scale", help="Spacing of the points: log (default) or linear."),
    ] = None,
    pi_theta: Annotated[
        float | None,
        typer.Option(
            "--pi-theta", help="π_θ(y), fixed while π_old is swept (default 0.5); in (0, 1]."
        ),
    ] = None,
    pi_old: Annotated[
        float | None,
        typer.Option(
            "--pi-old", help="π_old(y), fixed while π_θ is swept (default 0.5); in (0, 1]."
        ),
    ] = None,
    advantage: Annotated[
        float | None,
        typer.Option(
            "--advantage",
            "-a",
            help="|A| > 0; every loss is swept at A = +|A| and at A = −|A|. Default 1.",
        ),
    ] = None,
    output_format: Annotated[
        SweepFormat,
        typer.Option(
            "--format",
            "-f",
            help="table: the summary for people. json (an array), jsonl (one object per "
            "line) or csv: one flat record per (loss, variant, sign of A, point), loadable by "
            "pandas as it is; columns in docs/sweep.md. summary: the table's content as one "
            "JSON document (schema gradlens.sweep/2, see `gradlens schema --report sweep`): "
            "the config, the grid, per curve where ∂L/∂z_y = 0 and why, where it exceeds 10× "
            "REINFORCE, its maxima, and the autograd check with pass/fail; no records.",
        ),
    ] = SweepFormat.table,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            "-p",
            parser=output_file,
            metavar="FILE.png",
            help="Also draw the sweep to FILE (.png, .svg or .pdf; needs matplotlib, the "
            "`plot` extra): a panel per sign of A, or heat maps for --vary both.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            metavar="FILE",
            parser=output_file,
            help="Write the records or the summary to FILE instead of stdout (format: "
            "--format, else the file's suffix .json/.jsonl/.csv, which means records); the "
            "summary table then goes to stdout. FILE appears only once complete.",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit with status 1 if the closed form and autograd disagree at the checked "
            "points by more than the float64 tolerance (the check itself always runs, and "
            "the output is written either way; the summary's `passed` says which).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Sweep π_old(y), π_θ(y) or both; show each loss's gradient on the sampled token's logit.

    Per loss, sign of A and point: r, ∂L/∂z_y = c·(1 − π_θ(y)) and the other rows' Σ|∂L/∂z_j|.

    Also: whether a rule (clip, mask) switched the token off, and the gain over REINFORCE.

    Closed form throughout; a regular subset of the points is checked against autograd.

    With no options: unclipped PPO explodes as π_old → 0; the clip stops it for A > 0 only.
    """
    passed = True
    with user_errors(debug):
        from gradlens.sweep import build_sweep_config, run_sweep
        from gradlens.sweep.run import work_units

        names = None if losses is None else [n.strip() for n in losses.split(",") if n.strip()]
        flags = {
            "losses": names,
            "vary": None if vary is None else vary.value,
            "advantage": advantage,
            "pi_theta.fixed": pi_theta,
            "pi_old.fixed": pi_old,
        }
        axis = {
            "min": low,
            "max": high,
            "points": points,
            "scale": None if scale is None else scale.value,
        }
        cfg = build_sweep_config(config, overrides or [], over or [], flags, axis)
        data_format = record_format(output_format, output)
        check_distinct({"--output": output, "--plot": plot})
        if output is not None:
            check_output(output, "--output")
        if plot is not None:
            from gradlens.report.plots import check_plot_path

            check_plot_path(plot)
        units = work_units(cfg)
        with _progress(units >= PROGRESS_FROM, units) as progress:
            outcome = run_sweep(cfg, progress.compute)
            if data_format is not None:
                count = _write(outcome, data_format, output, progress.write)
        if data_format == SweepFormat.summary.value and output is not None:
            stderr_console().print(
                f"wrote the summary ({outcome.report.schema_version}) to {output}"
            )
        elif data_format is not None and output is not None:
            stderr_console().print(f"wrote {count:,} {data_format} records to {output}")
        if plot is not None:  # every file before the table: an error leaves stdout empty
            from gradlens.report.plots import plot_sweep

            plot_sweep(outcome, plot)
            stderr_console().print(f"wrote the plot to {plot}")
        if output_format is SweepFormat.table or output is not None:
            from gradlens.report.sweep_table import render_sweep

            with stdout_errors():
                render_sweep(outcome, stdout_console())
        passed = outcome.report.check.passed
    if check and not passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _write(outcome: SweepOutcome, fmt: str, output: Path | None, tick: Tick) -> int:
    """Write the records or the summary to ``output`` or stdout; the number of records."""
    from gradlens.report import sweep_serialize

    def write(stream: IO[str]) -> int:
        if fmt == SweepFormat.summary.value:
            sweep_serialize.write_summary(outcome.report, stream)
            return 0
        return sweep_serialize.write_records(outcome.rows(), outcome.columns(), fmt, stream, tick)

    if output is None:
        with stdout_errors():
            return write(sys.stdout)
    with writing(output, "--output") as f:
        return write(f)


class _Bar:
    """Progress callbacks for the two long phases; they do nothing when no bar is shown."""

    def __init__(self, progress: Progress | None, rows: int) -> None:
        self._progress = progress
        if progress is not None:
            self._compute = progress.add_task("computing curves", total=None)
            self._write = progress.add_task("writing records", total=rows, visible=False)

    def compute(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._compute, completed=done, total=total)

    def write(self, rows: int) -> None:
        if self._progress is not None:
            self._progress.update(self._write, advance=rows, visible=True)


@contextmanager
def _progress(show: bool, rows: int) -> Iterator[_Bar]:
    """A rich progress bar on stderr while the block runs, if ``show``; removed when done."""
    if not show:
        yield _Bar(None, rows)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        yield _Bar(progress, rows)
