"""Progress of the long steps of a run (loading, sampling, optimizer steps, gradients) on stderr.

`progress_bar` yields a callback for `gradlens.progress.reporting`. On a terminal it draws a
bar, one line per task, from the first report on, and removes it at the end. Elsewhere (a pipe,
a CI log) it writes plain lines instead: one when a task starts, one at most every
`LOG_INTERVAL` seconds while it runs, and one with its wall time when it is done — so a run of
minutes is never silent. stdout (the report) is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from gradlens.cli.common import stderr_console
from gradlens.progress import ProgressFn

LOG_INTERVAL = 15.0  # seconds between two lines of one running task (not a terminal)


@contextmanager
def progress_bar() -> Iterator[ProgressFn | None]:
    console = stderr_console()
    if not console.is_terminal:
        yield progress_lines(console)
        return
    bar = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(task: str, completed: int, total: int) -> None:
        if not tasks:
            bar.start()
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=max(total, 1))
        bar.update(tasks[task], completed=completed, total=max(total, 1))

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def progress_lines(console: Console) -> ProgressFn:
    """The callback that logs plain lines (see the module docstring)."""
    started: dict[str, float] = {}
    last_line: dict[str, float] = {}
    finished: set[str] = set()

    def write(text: str) -> None:
        console.print(f"gradlens: {text}", markup=False, highlight=False, soft_wrap=True)

    def update(task: str, completed: int, total: int) -> None:
        now = time.monotonic()
        if task not in started or (task in finished and completed < total):
            started[task] = last_line[task] = now
            finished.discard(task)
            write(f"{task} … ({completed}/{total})")
            if completed < total:
                return
        if completed >= total:
            if task not in finished:
                finished.add(task)
                write(f"{task} done ({total}/{total}) in {now - started[task]:.1f} s")
            return
        if now - last_line[task] >= LOG_INTERVAL:
            last_line[task] = now
            write(f"{task} {completed}/{total} after {now - started[task]:.0f} s")

    return update
