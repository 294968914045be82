"""Progress of long steps (sampling, optimizer steps), reported without importing a renderer.

The model source calls `report(task, completed, total)`; nothing happens unless a caller
installed a callback with `reporting` (the CLI draws a progress bar on stderr with it). A
context variable carries the callback, so no function signature between the CLI and the
source has to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

ProgressFn = Callable[[str, int, int], None]  # (task description, completed, total)

_CALLBACK: ContextVar[ProgressFn | None] = ContextVar("gradlens_progress", default=None)


@contextmanager
def reporting(callback: ProgressFn | None) -> Iterator[None]:
    """Send every `report` inside the block to ``callback``."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


def report(task: str, completed: int, total: int) -> None:
    """``completed`` of ``total`` units of ``task`` are done."""
    callback = _CALLBACK.get()
    if callback is not None:
        callback(task, completed, total)
