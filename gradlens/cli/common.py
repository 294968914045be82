"""What every command shares: the console, the options, and turning errors into exits."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from gradlens.errors import GradlensError, SharedError
from gradlens.files import os_reason

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file; without one the built-in default runs.",
    ),
]


def set_option(example: str) -> Any:
    """The ``--set KEY=VALUE`` option of a command, with an example of its own keys."""
    return typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override one config value by its dotted path (repeatable), e.g. "
        f"{example}. The value is read as YAML. "
        "Precedence: command-line flags > --set > --config file > defaults.",
    )


SetOption = Annotated[
    list[str] | None, set_option("--set loss.eps_high=0.4 --set source.vocab_size=512")
]
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        help="Show Python tracebacks instead of one-line errors; the exit status stays the "
        "error's (2 for bad input, 3 for a bug in gradlens).",
    ),
]


def output_file(text: str) -> Path:
    """The ``parser`` of every option that names a file to write: the path as given, but one
    ending in a path separator names a directory and is refused (``Path`` would drop the
    separator, and ``-o adir.pt/`` would write a file ``adir.pt``)."""
    if not text.strip():
        raise typer.BadParameter("the file name is empty; give a file to write")
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter(
            f"{text!r} ends in {text[-1]!r}, so it names a directory; give a file name"
        )
    return Path(text)


def finite_non_negative(value: float) -> float:
    """The ``callback`` of a float option that takes a finite number ≥ 0: NaN is named as
    what it is (a range check would call it "not ≥ 0")."""
    if not (math.isfinite(value) and value >= 0.0):
        raise typer.BadParameter(f"{value} is not a finite number ≥ 0")
    return value


def stdout_console() -> Console:
    """The report console. When stdout is not a terminal nothing is wrapped or truncated."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, no_color=True, highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def stdout_errors() -> Iterator[None]:
    """Write the report to stdout inside this block: a full disk or a closed pipe is not a bug.

    A reader that stops early (`gradlens sweep -f csv | head`) ends the command quietly with
    status 0; any other OS error (no space left where stdout is redirected) is a
    `GradlensError`. Either way stdout is then pointed at the null device, so that Python's own
    flush at exit does not fail a second time.
    """
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        with suppress(OSError, ValueError):  # no file descriptor: a test's captured stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            raise typer.Exit(0) from None
        raise GradlensError(f"stdout: {os_reason(exc)}") from None


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the
    CPU allocator's RuntimeError, which torch raises with this text and no type of its own."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def error_status(exc: BaseException) -> int:
    """The exit status of an error: 2 for the user's (a `GradlensError`, an `OSError` about a
    path they gave, or memory that ran out: the batch is the user's to shrink), 3 for
    gradlens's own bugs."""
    if isinstance(exc, GradlensError | OSError) or out_of_memory(exc):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


@contextmanager
def user_errors(debug: bool, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Turn a `GradlensError` (and any unexpected error) into one message and a non-zero exit.

    ``rank`` of ``world`` processes (torchrun): a `SharedError`, which every rank raised alike,
    is printed by rank 0 alone; any other error by its own rank, which the message names.
    With ``debug`` the error propagates, for the console entry point to show its traceback
    and exit with its `error_status`.
    """

    def who(message: str) -> str:
        head = f"rank {rank} of {world}"
        return message if world == 1 or message.startswith(head) else f"{head}: {message}"

    try:
        yield
    except GradlensError as exc:
        if debug:
            raise
        if rank == 0 or not isinstance(exc, SharedError):
            text = str(exc) if isinstance(exc, SharedError) else who(str(exc))
            stderr_console().print(Text("error: ", style="bold red") + Text(text))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, OSError):  # the file system's answer about a path the user gave
            where = f"{str(exc.filename)!r}: " if exc.filename is not None else ""
            stderr_console().print(
                Text("error: ", style="bold red") + Text(who(f"{where}{os_reason(exc)}"))
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None
        if out_of_memory(exc):  # a batch beyond the memory estimates: the user's to shrink
            lines = str(exc).splitlines()  # a bare MemoryError() has no message
            cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            stderr_console().print(
                Text("error: ", style="bold red")
                + Text(
                    who(
                        f"out of memory ({cause}); make the batch smaller, or for a large "
                        "vocabulary use --engine streamed"
                    )
                )
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None
        stderr_console().print(
            Text("internal error: ", style="bold red")
            + Text(who(f"{type(exc).__name__}: {exc}") + "\n")
            + Text("This is a bug in gradlens; rerun with --debug for the traceback.")
        )
        raise typer.Exit(EXIT_INTERNAL) from None
