"""`gradlens compare` on a tensor-parallel group: each of P ranks holds V_r rows of the lm_head.

Under ``diagnostics.tensor_parallel`` P > 1, `gradlens.compare.run_compare` runs in each of P
processes of one process group (torchrun starts them; `gradlens.cli` joins the group), with the
same config on every rank, and returns the same report on every rank:

1. **The batch** (`prepare`): every rank builds it from the config, as one process would, and
   keeps only its rows [v0_r, v1_r) of W. A batch file is split at load or read from a file of
   the rank's own (`gradlens.sources.batch`); every other source builds the whole W and keeps
   its rows of the balanced split (`shard_batch`). A rank that fails here (a file only it cannot
   read) does not leave the others waiting: the ranks exchange their errors at the end of the
   phase (`together`) and every rank raises the same `SharedError`, naming the ranks that failed.
2. **The split** (`vocab_split_of`): the ranks' rows, gathered, must be consecutive in rank
   order and cover [0, V).
3. **The same inputs**: the engine and the losses need the hidden states, the sampled ids and
   everything the coefficients read to be bitwise the same on every rank; one all_gather of
   their hashes checks it (`gradlens.engine.collectives.check_replicated`).
4. **The engine**: the vocab-parallel pass (`gradlens.engine.vocab_parallel`, called by
   `gradlens.compare.streamed.run_streamed`); every rank gets the result of the whole W.
5. **The report**: built on every rank from that result, with the errors of this phase
   exchanged as in step 1.

Why every rank builds the batch rather than rank 0 building and broadcasting it: a trainer's
tensor-parallel ranks hold exactly this (the tokens' hidden states, replicated, and their rows
of W), and a rank-0 build would need the whole W on one rank, which tensor parallelism exists to
avoid; a model source's batch also carries the loaded model, which is no tensor to broadcast.
Every source is deterministic given the config (seeded draws, files read alike), and step 3
turns any difference into a clear error instead of wrong numbers. The cost: each rank repeats the
source's work (the model source's rollout runs on every rank).

Inside the engine a rank that raises (or hangs) makes the others fail in their next collective:
at once when its process exits and closes its connections, else after the process group's
timeout, with a `CollectiveError` naming the rank and the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from gradlens.containers import Batch, VocabRows
from gradlens.engine.collectives import Collectives, check_replicated, exchange_errors
from gradlens.engine.vocab_split import VocabSplit, balanced_split
from gradlens.errors import GradlensError, SharedError


@dataclass(frozen=True)
class VocabParallel:
    """The tensor-parallel group as the engine needs it: its collectives, every rank's rows, and
    the device of the backend's tensors."""

    comm: Collectives
    split: VocabSplit
    device: torch.device

    def smallest(self, value: int) -> int:
        """min over the ranks of ``value`` (each rank's own)."""
        x = torch.tensor([-value], dtype=torch.int64, device=self.device)
        return -int(self.comm.all_reduce(x, "max", "min")[0])


def tensor_parallel_group(ranks: int, group: dist.ProcessGroup | None = None) -> Collectives | None:
    """The collectives of the ``ranks``-process group (``group``, or the default group when
    None); None for ``ranks`` 1. A group that is missing or of another size is an error."""
    if ranks == 1:
        return None
    launch = (
        f"launch with torchrun --nproc-per-node {ranks} -m gradlens compare --tensor-parallel "
        f"{ranks} (the command line joins the group), or pass run_compare a process group of "
        f"{ranks} ranks"
    )
    if not (dist.is_available() and dist.is_initialized()):
        raise GradlensError(
            f"diagnostics.tensor_parallel: {ranks} ranks need one process each in a process "
            f"group, and none is initialised in this process; {launch}"
        )
    comm = Collectives(group)
    if comm.world != ranks:
        raise SharedError(
            f"diagnostics.tensor_parallel: {ranks} ranks, but the process group has "
            f"{comm.world}; {launch}"
        )
    return comm


def shard_batch(batch: Batch, rank: int, world: int) -> Batch:
    """``batch`` with only ``rank``'s rows of W, the balanced split of ``world`` ranks; a batch
    that already holds some rows only (a source split it) is returned as it is."""
    rows = batch.weight_rows
    if rows is not None and (rows.start, rows.stop) != (0, rows.vocab):
        return batch
    vocab = batch.vocab_size
    v0, v1 = balanced_split(vocab, world).shard(rank)
    # a copy, so that the whole W can be freed (unless a loaded model still holds it)
    weight = batch.weight[v0:v1].clone()
    return replace(batch, weight=weight, weight_rows=VocabRows(v0, v1, vocab))


def vocab_split_of(batch: Batch, comm: Collectives, device: torch.device) -> VocabSplit:
    """Every rank's rows, gathered (one all_gather of three integers per rank); they must be
    consecutive in rank order and cover [0, V)."""
    rows = batch.weight_rows
    assert rows is not None, "shard_batch first"
    mine = torch.tensor([rows.start, rows.stop, rows.vocab], dtype=torch.int64, device=device)
    every = [tuple(r) for r in comm.all_gather(mine, "rows").cpu().tolist()]  # [P, 3]
    vocab = every[0][2]
    bounds = [0] + [stop for _, stop, _ in every]
    tiles = all(
        v == vocab and start == bounds[r] and stop > start
        for r, (start, stop, v) in enumerate(every)
    )
    if not tiles or bounds[-1] != vocab:
        held = "; ".join(f"rank {r} [{a}, {b}) of {v}" for r, (a, b, v) in enumerate(every))
        raise SharedError(
            "tensor_parallel: the ranks' rows of the lm_head must be consecutive in rank order, "
            f"at least one each, and cover the vocabulary [0, V); they hold {held} (per-rank "
            "batch files say which rows they hold with vocab_offset and vocab_size)"
        )
    return VocabSplit(tuple(bounds))


def replicated_inputs(batch: Batch) -> dict[str, Tensor]:
    """What the engine and the losses read besides W: the same on every rank."""
    optional: dict[str, Tensor | None] = {
        "rollout_logp": batch.rollout_logp,
        "ref_logp": batch.ref_logp,
        "on_policy": batch.on_policy,
    }
    kept = batch.kept
    if kept is not None:  # K_t (global ids) and the kept masses replay reads
        optional |= {
            "kept_ids": kept.ids,
            "old_kept_log_mass": kept.old_log_mass,
            "rollout_kept_log_mass": kept.rollout_log_mass,
            "ref_kept_log_mass": kept.ref_log_mass,
        }
    return {
        "hidden": batch.hidden,
        "tokens": batch.tokens,
        "mask": batch.mask,
        "old_logp": batch.old_logp,
        "advantages": batch.advantages,
        **{name: x for name, x in optional.items() if x is not None},
    }


@contextmanager
def together(comm: Collectives, step: str, device: torch.device) -> Iterator[None]:
    """Run a phase without collectives of its own, then exchange the ranks' outcomes: when a
    rank raised a `GradlensError`, every rank raises one `SharedError` that names each failed
    rank and its message. (Any other exception leaves this rank at once; the others then fail in
    the exchange with a `CollectiveError`.)"""
    error = None
    try:
        yield
    except GradlensError as exc:
        error = str(exc)
    errors = exchange_errors(comm, error, step, device)
    if any(e is not None for e in errors):
        raise SharedError(ranks_failed(errors)) from None


def ranks_failed(errors: list[str | None]) -> str:
    """One message for the ranks' errors (None where a rank succeeded)."""
    world = len(errors)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if len(failed) == world and len(set(errors)) == 1:
        return f"every rank of {world}: {failed[0][1]}"
    if len(failed) == 1:
        return f"rank {failed[0][0]} of {world}: {failed[0][1]}"
    return f"{len(failed)} of {world} ranks failed:\n" + "\n".join(
        f"  rank {r}: {e}" for r, e in failed
    )


def prepare(
    build: Callable[[], Batch], comm: Collectives, device: torch.device
) -> tuple[Batch, VocabParallel]:
    """Steps 1–3 of the module docstring: this rank's batch and the group's split."""
    with together(comm, "source", device):
        batch = shard_batch(build(), comm.rank, comm.world)
    split = vocab_split_of(batch, comm, device)
    check_replicated(comm, replicated_inputs(batch), "inputs")
    return batch, VocabParallel(comm, split, device)
