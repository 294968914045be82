"""The ``gradlens`` command: one Typer module per command; the only place that does I/O."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from gradlens import __version__
from gradlens.cli.common import error_status
from gradlens.cli.compare import HELP as COMPARE_HELP
from gradlens.cli.compare import compare
from gradlens.cli.dump import HELP as DUMP_HELP
from gradlens.cli.dump import dump
from gradlens.cli.info import config, losses, schema
from gradlens.cli.process_exit import exit_process
from gradlens.cli.sweep import sweep
from gradlens.cli.trace import HELP as TRACE_HELP
from gradlens.cli.trace import trace

app = typer.Typer(
    name="gradlens",
    help="Gradient diagnostics for LLM RL and SFT losses: what each loss does to the lm_head.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gradlens {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print gradlens's version and exit.",
        ),
    ] = False,
) -> None:
    """Gradient diagnostics for LLM RL and SFT losses: what each loss does to the lm_head."""


app.command(help=COMPARE_HELP)(compare)
app.command()(losses)
app.command()(config)
app.command()(schema)
app.command()(sweep)
app.command(help=DUMP_HELP)(dump)
app.command(help=TRACE_HELP)(trace)


def main() -> None:
    """Console-script entry point.

    Under torchrun (``--tensor-parallel``) the app runs inside torch's ``record``, which hands
    an uncaught exception's traceback to torchrun's failure summary: the traceback of a rank
    run with ``--debug``; without it every error ends in one message and an exit status, and
    the summary shows only the status. The process then ends with the command's status,
    without the interpreter's teardown (`exit_process`). An exception escapes the app only
    under ``--debug``: its traceback is printed and the status is the one the error has
    without ``--debug`` (2 for the user's errors, 3 for gradlens's bugs), not Python's 1.
    """
    try:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun in every process it starts
            from torch.distributed.elastic.multiprocessing.errors import record

            record(app)()  # returns where the app exits with status 0
        else:
            app()
    except SystemExit as stop:
        exit_process(stop.code)
    except Exception as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # Typer's: the traceback, formatted
        exit_process(error_status(exc))
    exit_process(0)
