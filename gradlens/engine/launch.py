"""Start a process group, and run a function on P local ranks with every rank's error reported.

`init_process_group` picks the backend from the device (gloo on CPU, NCCL on CUDA) and puts a
timeout on every collective, so that a rank whose peer raised or hangs fails after at most that
long instead of waiting forever. Under ``torchrun`` it reads the rank and world size from the
environment; `run_ranks` passes them itself.

`run_ranks(fn, P, args)` runs ``fn(rank, P, *args)`` in P fresh processes (the "spawn" start
method of torch.multiprocessing), each in a gloo (or NCCL) group initialised through a file
store in a temporary folder, and returns the P return values in rank order. Unlike
``torch.multiprocessing.spawn(join=True)``, which stops the other ranks as soon as one fails,
it lets every rank finish or fail on its own and then raises one `RankFailure` that lists each
rank's outcome, the rank that raised first (by its own clock) first. A rank still running
``timeout_s + grace_s`` seconds after another failed, or past ``deadline_s``, is killed and
reported as such.

A rank that returned leaves through ``os._exit(0)`` once its result is on disk and its process
group destroyed: the interpreter's own shutdown is skipped, because that is where a C++ thread
left by a backend (a gloo worker, a loader's pool) can find the interpreter half torn down and
abort the process (``terminate called without an active exception``, signal 6) after the work
was done. A rank that still dies after writing its result is reported with the signal's name
and where it died.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradlens.errors import GradlensError

DEFAULT_TIMEOUT_S = 300.0


def backend_for(device: torch.device | str) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(
    device: torch.device | str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Join the default process group with the device's backend and a collective timeout.

    Without ``init_method`` the rendezvous comes from the environment torchrun sets
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
    """
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
    dist.init_process_group(backend_for(device), **kwargs)


@dataclass(frozen=True)
class RankOutcome:
    """How one rank ended: ``error`` None when it returned."""

    rank: int
    error: str | None  # "ExceptionType: message", or why it was stopped
    traceback: str | None
    failed_at: float | None  # time.time() when it raised (None: killed or returned)


class RankFailure(GradlensError):
    """One or more ranks failed; ``outcomes`` has every rank's."""

    def __init__(self, outcomes: list[RankOutcome]):
        self.outcomes = outcomes
        failed = [o for o in outcomes if o.error is not None]
        first = min(
            failed, key=lambda o: (o.failed_at is None, o.failed_at or 0.0, o.rank), default=None
        )
        lines = [f"{len(failed)} of {len(outcomes)} ranks failed"]
        if first is not None:
            lines[0] += f"; rank {first.rank} first: {first.error}"
        for o in outcomes:
            lines.append(f"  rank {o.rank}: {'ok' if o.error is None else o.error}")
        super().__init__("\n".join(lines))


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world: int,
    args: Sequence[Any],
    folder: str,
    timeout_s: float,
    device: str,
    threads: int | None,
) -> None:
    out = Path(folder)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":  # one device per rank, before NCCL starts
            torch.cuda.set_device(rank % torch.cuda.device_count())
        init_process_group(device, timeout_s, f"file://{out / 'store'}", rank, world)
        result = fn(rank, world, *args)
        _write(out / f"rank{rank}.result", result)
    except BaseException as e:
        record = {
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
            "failed_at": time.time(),
        }
        _write(out / f"rank{rank}.error", record)
        # Leave at once: the peers' collectives then fail on the closed connections instead of
        # waiting for the timeout (a clean shutdown could itself wait on them).
        _leave(1)
    dist.destroy_process_group()
    (out / f"rank{rank}.closed").touch()
    _leave(0)  # without the interpreter's shutdown (module docstring)


def _write(path: Path, value: Any) -> None:
    """``value`` pickled to ``path``, whole or not at all (written beside it, then renamed)."""
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as fh:
        pickle.dump(value, fh)
    os.replace(partial, path)


def _leave(code: int) -> None:
    """End this process now with ``code``, its output flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed or gone: nothing to flush
            stream.flush()
    os._exit(code)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: Sequence[Any] = (),
    timeout_s: float = 60.0,
    grace_s: float = 10.0,
    deadline_s: float | None = None,
    device: str = "cpu",
    threads: int | None = 1,
) -> list[Any]:
    """``[fn(0, world, *args), …, fn(world − 1, world, *args)]``, each run on its own rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s``: the
    collective timeout; ``grace_s``: how much longer than that the others may run after one
    rank failed; ``deadline_s``: a limit on the whole run (None: none). ``threads``: torch's
    intra-op threads per rank (P ranks share the machine's cores; None: torch's default).
    """
    folder = tempfile.mkdtemp(prefix="gradlens-ranks-")
    try:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, fn, world, tuple(args), folder, timeout_s, device, threads),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        start = time.monotonic()
        first_failure: float | None = None
        killed: dict[int, str] = {}
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_failure is None and any(
                p.exitcode not in (None, 0) for p in procs if not p.is_alive()
            ):
                first_failure = now
            limit = None
            if first_failure is not None:
                limit = (first_failure + timeout_s + grace_s, "after another rank failed")
            if deadline_s is not None and (limit is None or start + deadline_s < limit[0]):
                limit = (start + deadline_s, "at the run's deadline")
            if limit is not None and now >= limit[0]:
                for r, p in enumerate(procs):
                    if p.is_alive():
                        p.kill()
                        killed[r] = (
                            f"still running {now - start:.0f} s after the start, "
                            f"{limit[1]}; stopped"
                        )
                break
            wait([p.sentinel for p in procs if p.is_alive()], timeout=0.1)
        for p in procs:
            p.join()
        return _collect(folder, procs, killed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _collect(folder: str, procs: list[Any], killed: dict[int, str]) -> list[Any]:
    out = Path(folder)
    results: list[Any] = []
    outcomes: list[RankOutcome] = []
    for r, p in enumerate(procs):
        result_file, error_file = out / f"rank{r}.result", out / f"rank{r}.error"
        if r in killed:
            outcomes.append(RankOutcome(r, killed[r], None, None))
        elif error_file.exists():
            with open(error_file, "rb") as fh:
                rec = pickle.load(fh)
            outcomes.append(RankOutcome(r, rec["error"], rec["traceback"], rec["failed_at"]))
        elif p.exitcode == 0 and result_file.exists():
            with open(result_file, "rb") as fh:
                results.append(pickle.load(fh))
            outcomes.append(RankOutcome(r, None, None, None))
        else:
            outcomes.append(RankOutcome(r, _ending(p.exitcode, out, r), None, None))
    if any(o.error is not None for o in outcomes):
        raise RankFailure(outcomes)
    return results


def _ending(exitcode: int | None, out: Path, rank: int) -> str:
    """How rank ``rank``'s process ended, when it left neither a result nor an error: its exit
    code (a signal by name), and how far it got."""
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        with suppress(ValueError):  # not a signal this platform names
            how += f" ({signal.Signals(-exitcode).name})"
    if (out / f"rank{rank}.closed").exists():
        where = "after writing its result and destroying its process group"
    elif (out / f"rank{rank}.result").exists():
        where = "after writing its result, while destroying its process group"
    else:
        where = "before writing a result or an error"
    return f"the process ended with {how}, {where}"
