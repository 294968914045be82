"""``gradlens trace``: a training run's steps, from its metrics JSONL and batch files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gradlens.cli.common import (
    DebugOption,
    finite_non_negative,
    output_file,
    stderr_console,
    stdout_console,
    user_errors,
)
from gradlens.errors import GradlensError

HELP = (
    "Show a training run as it evolved: read DIR_OR_GLOB (the metrics.jsonl and the "
    "step_*.safetensors batch files a gradlens hook wrote, or any batch files, ordered by their "
    "sidecar's step or the number in the name), diagnose every batch file, print one row per "
    "step (grad_norm, lm_head gradient norm per loss, clip fractions, ratio quantiles, KL, "
    "entropy, training–inference mismatch), detect spikes (running median + MAD) and list the "
    "largest contributors of each spike step. Bad files are reported by name and skipped."
)


class TraceFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


def trace(
    target: Annotated[
        str, typer.Argument(metavar="DIR_OR_GLOB", help="A run directory or a glob.")
    ],
    output_format: Annotated[
        TraceFormat, typer.Option("--format", help="table, json (gradlens.trace/1), jsonl, csv.")
    ] = TraceFormat.table,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            parser=output_file,
            help="Also draw the run: .png, .svg or .pdf.",
        ),
    ] = None,
    window: Annotated[int, typer.Option(min=1, help="Steps in the running median.")] = 20,
    threshold: Annotated[
        float,
        typer.Option(
            callback=finite_non_negative, help="Robust z (≥ 0) above which a step spikes."
        ),
    ] = 5.0,
    min_history: Annotated[
        int, typer.Option(min=1, help="Earlier steps before any judgement.")
    ] = 3,
    top_k: Annotated[int, typer.Option(min=1, help="Contributors listed per spike.")] = 5,
    losses: Annotated[
        str | None, typer.Option(help="Comma-separated losses for every batch file.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="A checkpoint directory (or 'builtin') to decode tokens.")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Trace a run."""
    with user_errors(debug):
        from gradlens.cli.progress import progress_bar
        from gradlens.progress import reporting
        from gradlens.report.plots import check_plot_path
        from gradlens.report.trace import trace_csv, trace_json, trace_jsonl, trace_renderable
        from gradlens.report.trace_plot import plot_trace
        from gradlens.trace.run import TraceSettings, trace_run

        if not target.strip():
            raise GradlensError("DIR_OR_GLOB is empty; give a run directory or a glob")
        names = None if losses is None else tuple(x.strip() for x in losses.split(",") if x.strip())
        if names == ():
            raise GradlensError(f"--losses {losses!r} names no loss; leave it out for the defaults")
        if plot is not None:
            check_plot_path(plot)
        settings = TraceSettings(
            window=window,
            threshold=threshold,
            min_history=min_history,
            top_k=top_k,
            losses=names,
            tokenizer=tokenizer,
        )
        with progress_bar() as bar, reporting(bar):
            result = trace_run(target, settings)
        if plot is not None:
            plot_trace(result, plot)
            stderr_console().print(f"wrote {plot}")
        for bad in result.bad_files:
            if output_format is not TraceFormat.table:
                stderr_console().print(f"skipped {bad.name}: {bad.error}")
        if output_format is TraceFormat.table:
            stdout_console().print(trace_renderable(result))
        elif output_format is TraceFormat.json:
            typer.echo(trace_json(result))
        elif output_format is TraceFormat.jsonl:
            typer.echo(trace_jsonl(result), nl=False)
        else:
            typer.echo(trace_csv(result), nl=False)
