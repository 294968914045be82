"""A progress bar on stderr for the long steps of a run (sampling, optimizer steps).

`progress_bar` yields a callback for `gradlens.progress.reporting`. The bar appears on the
first report, one line per task, and only when stderr is a terminal: pipes and CI logs stay
clean, and stdout (the report) is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from gradlens.cli.common import stderr_console
from gradlens.progress import ProgressFn


@contextmanager
def progress_bar() -> Iterator[ProgressFn | None]:
    console = stderr_console()
    if not console.is_terminal:
        yield None
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
