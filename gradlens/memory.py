"""Peak memory, estimated from the configured shapes and checked before anything is allocated.

Every source and every engine of ``compare`` has a small pure function that estimates, from
the sizes a configuration implies (N sequences × T positions, vocabulary V, hidden size H, the
dtype, k losses), the bytes its largest tensors hold at once: an `Estimate`, its total and the
terms it is made of. `check_fits` compares it with the memory available where those tensors
live — ``MemAvailable`` of /proc/meminfo (or the free pages sysconf reports) for the CPU,
``torch.cuda.mem_get_info`` for a GPU — and refuses, naming the settings, the estimate and what
is available, a run that cannot fit. So ``source.vocab_size=1000000000`` is one clear message
in a fraction of a second, not a 512 GB allocation that fails (or, worse, swaps) minutes later.

The estimates count the tensors that grow with N·T·V, M·V, V·H and N·T·H, not every small
temporary. Measured on the CPU as the growth of the peak resident memory (V = 65,536, float32,
the default synthetic batch otherwise): the synthetic source (drift none, then built on whole
tensors; it is built in vocabulary blocks at this size now) 1.39 GB estimated, 1.41 GB
measured; the materialized engine 1.21 GB and 1.21 GB, with the autograd reference
2.06 GB and 2.08 GB; the streamed engine 0.34 GB and 0.24 GB (its plan counts its buffers
generously). Before the batch exists the engine's estimate uses a lower bound on the number of
tokens in the loss (`Shape.tokens`); once the batch is built it is checked again with the real
count. Where the available memory cannot be read (no /proc, no sysconf) there is nothing to
compare with, and no refusal.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from gradlens.errors import GradlensError


@dataclass(frozen=True)
class Shape:
    """The sizes of a batch as a configuration implies them: N sequences on a grid of T
    positions, vocabulary V, hidden size H, and ``tokens``, the number M of positions in the
    loss, or a lower bound on it when only the data tells (the synthetic source's N·min_length;
    0 when nothing is known): an engine's estimate from it is then a lower bound, so that a
    refusal before the batch exists is certain."""

    sequences: int
    length: int
    vocab: int
    hidden: int
    tokens: int = 0


@dataclass(frozen=True)
class Estimate:
    """The peak memory of one stage: its largest tensors, named, with their bytes.

    Attributes:
        what: the stage ('the synthetic source', 'the materialized engine').
        settings: the settings that set the sizes, named by a refusal.
        terms: (description, bytes) of each tensor or group counted.
        host: True when the tensors live in host memory whatever the run's device (the
            sources build on the CPU and move the batch afterwards).
    """

    what: str
    settings: str
    terms: tuple[tuple[str, int], ...]
    host: bool = False

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def human(n: float) -> str:
    """Bytes in words: '512 GB', '3.1 MB' (powers of 1000, as disks and `free -h` agree on)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover - the loop returns


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def available(device: torch.device) -> tuple[int, str] | None:
    """(bytes available now, where that number comes from), or None when it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} (torch.cuda.mem_get_info)"
    meminfo = _meminfo_available()
    if meminfo is not None:
        return meminfo, "MemAvailable in /proc/meminfo"
    pages = _sysconf_available()
    if pages is not None:
        return pages, "free physical pages (sysconf)"
    return None


def check_fits(estimate: Estimate, device: torch.device) -> None:
    """Refuse ``estimate`` when it exceeds the memory available on ``device`` (the host for a
    host estimate), with the estimate, its largest terms and what is available."""
    where = torch.device("cpu") if estimate.host else device
    room = available(where)
    if room is None or estimate.total <= room[0]:
        return
    largest = sorted(estimate.terms, key=lambda term: -term[1])[:3]
    terms = "; ".join(f"{name} {human(b)}" for name, b in largest)
    place = "this machine" if where.type == "cpu" else str(where)
    raise GradlensError(
        f"{estimate.settings}: {estimate.what} needs about {human(estimate.total)} of memory at "
        f"its peak ({terms}), and {place} has {human(room[0])} available ({room[1]}); make "
        "the batch smaller"
    )


def release_free_memory() -> None:
    """Give the pages the C allocator holds free back to the system (glibc's ``malloc_trim``).

    Freed tensors return their memory to the allocator's free lists, not to the system: the
    resident memory of the process keeps the pages of every tensor freed since, and the next
    phase's tensors add to it. Between the model source's phases (the stale steps' optimizer
    state and graphs gone, the whole-model gradients' forward to come) a trim returns those
    pages; where there is no glibc it does nothing.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
