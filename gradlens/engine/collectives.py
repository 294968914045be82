"""The collectives of the distributed engine: one wrapper that runs them, counts their bytes and
turns a backend failure into an error that says which rank and which step failed.

Bytes are counted per rank, as the tensors handed to the backend determine them:

    payload   the elements this rank contributes × their size
    ring      what each rank sends under the ring algorithms NCCL and gloo use for large
              messages: (P − 1)·n·b for an all-gather of n elements per rank, 2·(P − 1)/P·n·b
              for an all-reduce of n elements (reduce-scatter, then all-gather), P the group size

docs/scaling.md adds these up per phase of the engine and checks them against its formulas.

A rank that raises leaves the others waiting in their next collective; with a timeout on the
process group (`gradlens.engine.launch.init_process_group`) they fail after it, or at once when
the failed rank's process has exited and closed its connections. Either way the backend's error
is re-raised as a `CollectiveError` naming this rank, the step and the operation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from gradlens.errors import GradlensError, SharedError

ReduceOp = Literal["sum", "max"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class CollectiveError(GradlensError):
    """A collective failed on this rank, most often because another rank failed or stopped."""


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as this rank ran it."""

    step: str  # the engine's name for it, e.g. "pass1" or "finish"
    op: str  # "all_gather", "all_reduce_sum" or "all_reduce_max"
    elements: int  # elements this rank contributed
    payload_bytes: int  # elements × element size
    ring_bytes: float  # bytes this rank sends under the ring algorithm


@dataclass
class Collectives:
    """The collectives of one process group (the default group when ``group`` is None).

    With no process group initialised (or a group of one) every collective is the identity,
    so the same code runs in one process.
    """

    group: dist.ProcessGroup | None = None
    log: list[CollectiveRecord] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def all_gather(self, x: Tensor, step: str) -> Tensor:
        """[P, *x.shape]: every rank's ``x``, in rank order (the same on every rank)."""
        p = self.world
        n = x.numel()
        self._record(step, "all_gather", n, x.element_size(), (p - 1) * n * x.element_size())
        if p == 1:
            return x[None].clone()
        out = torch.empty((p, *x.shape), dtype=x.dtype, device=x.device)
        self._run(step, "all_gather", lambda: dist.all_gather(list(out.unbind(0)), x, self.group))
        return out

    def all_reduce(self, x: Tensor, op: ReduceOp, step: str) -> Tensor:
        """``x`` reduced over the group (in place; returned)."""
        p = self.world
        n, b = x.numel(), x.element_size()
        self._record(step, f"all_reduce_{op}", n, b, 2 * (p - 1) / p * n * b)
        if p > 1:
            self._run(
                step, f"all_reduce_{op}", lambda: dist.all_reduce(x, _OPS[op], group=self.group)
            )
        return x

    def sent_bytes(self, step: str | None = None) -> float:
        """Ring bytes this rank sent, in all steps or in ``step``."""
        return sum(r.ring_bytes for r in self.log if step is None or r.step == step)

    def _record(self, step: str, op: str, n: int, b: int, ring: float) -> None:
        self.log.append(CollectiveRecord(step, op, n, n * b, ring))

    def _run(self, step: str, op: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # the backend's error: a peer failed, left or timed out
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CollectiveError(
                f"rank {self.rank} of {self.world}: the {op} of step '{step}' failed "
                f"({type(e).__name__}: {first}); another rank most likely raised or stopped "
                "before reaching it"
            ) from e


def exchange_errors(
    comm: Collectives, error: str | None, step: str, device: torch.device | str = "cpu"
) -> list[str | None]:
    """Every rank's error message (None where the rank succeeded), in rank order, on every rank.

    For a phase without collectives of its own, which a rank may leave by raising while the
    others finish it: each rank calls this at its end, with its own error or None, and every rank
    learns the same outcome. One all_gather of [failed, bytes] per rank, and only when a rank
    failed, one of the messages' UTF-8 bytes padded to the longest. ``device``: where the
    backend's tensors live (CUDA for NCCL).
    """
    data = b"" if error is None else error.encode()
    head = torch.tensor([error is not None, len(data)], dtype=torch.int64, device=device)
    heads = comm.all_gather(head, f"{step}.status").cpu()  # [P, 2]
    if not bool(heads[:, 0].any()):
        return [None] * comm.world
    longest = max(int(heads[:, 1].max()), 1)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = comm.all_gather(mine.to(device), f"{step}.errors").cpu()  # [P, longest]
    return [
        bytes(every[r, : int(heads[r, 1])].tolist()).decode() if heads[r, 0] else None
        for r in range(comm.world)
    ]


def _digest(x: Tensor) -> int:
    """A 63-bit hash of ``x``'s dtype, shape and bytes."""
    h = hashlib.blake2b(f"{x.dtype}{tuple(x.shape)}".encode(), digest_size=8)
    h.update(x.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_replicated(comm: Collectives, tensors: dict[str, Tensor], step: str = "check") -> None:
    """Raise the same `SharedError` on every rank when one of ``tensors`` is not bitwise the
    same on every rank of the group (one all_gather of a hash per tensor).

    The vocab-parallel engine needs the hidden states, the sampled ids and everything the
    coefficient callback reads to be identical on every tensor-parallel rank.
    """
    if not tensors:
        return
    device = next(iter(tensors.values())).device
    digests = torch.tensor([_digest(t) for t in tensors.values()], dtype=torch.int64)
    everyone = comm.all_gather(digests.to(device), step).cpu()  # [P, n]
    differ = []
    for i, name in enumerate(tensors):
        ranks = [str(r) for r in range(comm.world) if everyone[r, i] != everyone[0, i]]
        if ranks:
            differ.append(f"{name} (rank {', '.join(ranks)} against rank 0)")
    if differ:
        raise SharedError(
            "tensor_parallel: every rank must hold the same inputs, and these differ: "
            + "; ".join(differ)
        )
