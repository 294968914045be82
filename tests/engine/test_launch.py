"""`run_ranks`: how a rank's process ends is what its outcome says.

A rank that returned leaves without the interpreter's shutdown, so that an abort there (a
backend's thread finding the interpreter half torn down) cannot fail a rank whose work is done;
a rank that dies after writing its result is reported with the signal and where it died.
"""

from __future__ import annotations

import atexit
import os

import pytest
import torch.distributed as dist

from gradlens.engine.launch import RankFailure, run_ranks


def aborting_at_exit(rank: int, world: int) -> int:
    """Return this rank's number, with an exit handler that would abort the process."""
    atexit.register(os.abort)
    return rank


def aborting_in_teardown(rank: int, world: int) -> int:
    """Return this rank's number; rank 1's process group teardown aborts the process."""
    if rank == 1:
        dist.destroy_process_group = os.abort  # this spawned process's module, not the test's
    return rank


@pytest.mark.slow  # spawns two processes
def test_a_rank_that_returned_leaves_without_the_interpreters_shutdown():
    assert run_ranks(aborting_at_exit, 2, timeout_s=30) == [0, 1]


@pytest.mark.slow  # spawns two processes
def test_a_rank_killed_after_its_result_is_reported_with_the_signal_and_where():
    with pytest.raises(RankFailure) as info:
        run_ranks(aborting_in_teardown, 2, timeout_s=30)
    outcomes = {o.rank: o for o in info.value.outcomes}
    assert outcomes[0].error is None
    assert outcomes[1].error == (
        "the process ended with exit code -6 (SIGABRT), after writing its result, while "
        "destroying its process group"
    )
