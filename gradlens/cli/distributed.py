"""The command line under torchrun: join the tensor-parallel group, and which rank speaks.

torchrun starts one process per rank and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). With ``--tensor-parallel N``
(``diagnostics.tensor_parallel``) > 1, `process_group` checks that torchrun started N processes,
joins the default process group (gloo on CPU, NCCL on CUDA with one device per local rank, every
collective bounded by ``diagnostics.collective_timeout_s``) and leaves it at the end.

Who speaks: rank 0 alone shows progress and writes the report. An error every rank raised alike
(a `SharedError`: the ranks exchanged their errors, or the same check failed everywhere) is
printed by rank 0 alone; any other error by the rank that raised it, prefixed with its rank.
Every rank exits with the same status: 2 for bad input, whichever rank it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradlens.compare.run import resolve_device
from gradlens.config import Config
from gradlens.engine.launch import init_process_group
from gradlens.errors import GradlensError, SharedError


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def speaks(self) -> bool:
        """This process prints the report and the shared errors."""
        return self.rank == 0


def launched() -> Launch:
    """This process's place, from torchrun's environment variables."""
    try:
        return Launch(
            rank=int(os.environ.get("RANK", "0")),
            world=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        raise GradlensError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
            f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}"
        ) from None


@contextmanager
def process_group(config: Config, launch: Launch) -> Iterator[None]:
    """Inside the block this process is rank ``launch.rank`` of the tensor-parallel group (for
    ``diagnostics.tensor_parallel`` > 1; nothing to join otherwise)."""
    ranks = config.diagnostics.tensor_parallel
    command = f"torchrun --nproc-per-node {ranks} -m gradlens compare --tensor-parallel {ranks}"
    if ranks == 1:
        if launch.world > 1:
            raise SharedError(
                f"diagnostics.tensor_parallel is 1, but this is one of {launch.world} processes "
                f"(WORLD_SIZE={launch.world}); pass --tensor-parallel {launch.world} to split the "
                "lm_head over them, or run gradlens without torchrun"
            )
        yield
        return
    if launch.world == 1:
        raise GradlensError(
            f"--tensor-parallel {ranks} (diagnostics.tensor_parallel) needs {ranks} processes, "
            f"one per rank, and this is the only one; launch it with `{command} …`"
        )
    if launch.world != ranks:
        raise SharedError(
            f"--tensor-parallel {ranks} (diagnostics.tensor_parallel), but torchrun started "
            f"{launch.world} processes (WORLD_SIZE); pass --nproc-per-node {ranks}, or "
            f"--tensor-parallel {launch.world}"
        )
    device = resolve_device(config.device)
    if device.type == "cuda":  # one device per rank, before NCCL starts
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    try:
        init_process_group(device, config.diagnostics.collective_timeout_s)
    except Exception as exc:  # the rendezvous failed: a peer never came, the port was taken
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GradlensError(
            f"rank {launch.rank} of {launch.world}: cannot join the process group "
            f"({type(exc).__name__}: {first}); check that every rank was started with the same "
            "MASTER_ADDR and MASTER_PORT"
        ) from exc
    try:
        yield
    finally:
        dist.destroy_process_group()
