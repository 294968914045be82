"""How the lm_head's vocabulary rows are split over the ranks of a tensor-parallel group.

Rank r of TP ranks holds W's rows [v0_r, v1_r), with 0 = v0_0 < v1_0 = v0_1 < … < v1_{TP−1} = V.
Two splits are built in:

    even       V_r = V / TP for every rank (Megatron-LM's VocabParallelEmbedding and
               ColumnParallelLinear: it pads V to a multiple of TP first; gradlens does not pad,
               so V must be divisible by TP)
    balanced   the first V mod TP ranks get ⌈V/TP⌉ rows, the others ⌊V/TP⌋ (an uneven split
               when TP does not divide V; the same as ``even`` when it does)

and `VocabSplit.from_sizes` takes any sizes (each ≥ 1). A token id y belongs to the rank whose
range holds it (`VocabSplit.owner`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from gradlens.errors import GradlensError
from gradlens.losses.registry import unknown_name_message


@dataclass(frozen=True)
class VocabSplit:
    """Rank r holds rows [bounds[r], bounds[r + 1]); ``bounds`` has TP + 1 entries."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(hi <= lo for lo, hi in pairwise(b)):
            raise GradlensError(
                f"vocabulary split: bounds {list(b)} must start at 0 and increase strictly "
                "(every rank holds at least one row)"
            )

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> VocabSplit:
        """The split with V_r = ``sizes[r]`` rows on rank r."""
        if not sizes or any(int(s) < 1 for s in sizes):
            raise GradlensError(
                f"vocabulary split: sizes {list(sizes)} must be at least one positive number "
                "each (every rank holds at least one row)"
            )
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + int(s))
        return cls(tuple(bounds))

    @property
    def world(self) -> int:
        return len(self.bounds) - 1

    @property
    def vocab(self) -> int:
        return self.bounds[-1]

    @property
    def sizes(self) -> list[int]:
        return [hi - lo for lo, hi in pairwise(self.bounds)]

    def shard(self, rank: int) -> tuple[int, int]:
        """(v0, v1) of ``rank``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside [0, {self.world})")
        return self.bounds[rank], self.bounds[rank + 1]

    def weight_shard(self, weight: Tensor, rank: int) -> Tensor:
        """[V_r, H] the rows of ``weight`` [V, H] that ``rank`` holds (a view)."""
        if weight.shape[0] != self.vocab:
            raise GradlensError(
                f"vocabulary split: the weight has {weight.shape[0]} rows, the split {self.vocab}"
            )
        v0, v1 = self.shard(rank)
        return weight[v0:v1]

    def owner(self, tokens: Tensor) -> Tensor:
        """[M] the rank holding each token id of ``tokens`` [M] (ids in [0, V))."""
        inner = torch.tensor(self.bounds[1:-1], dtype=tokens.dtype, device=tokens.device)
        return torch.bucketize(tokens, inner, right=True)


def even_split(vocab: int, world: int) -> VocabSplit:
    """Megatron's split: V / TP rows on every rank; V must be a multiple of TP."""
    _check(vocab, world)
    if vocab % world:
        raise GradlensError(
            f"tensor_parallel: an even split of {vocab} vocabulary rows over {world} ranks needs "
            f"a multiple of {world} (Megatron pads the vocabulary); use the balanced split"
        )
    return VocabSplit.from_sizes([vocab // world] * world)


def balanced_split(vocab: int, world: int) -> VocabSplit:
    """The first V mod TP ranks get ⌈V/TP⌉ rows, the rest ⌊V/TP⌋."""
    _check(vocab, world)
    q, rem = divmod(vocab, world)
    return VocabSplit.from_sizes([q + (r < rem) for r in range(world)])


def _check(vocab: int, world: int) -> None:
    if world < 1:
        raise GradlensError(f"tensor_parallel: {world} ranks; allowed: 1 or more")
    if vocab < world:
        raise GradlensError(
            f"tensor_parallel: {world} ranks cannot split a vocabulary of {vocab} rows "
            f"(every rank holds at least one row); allowed: at most {vocab} ranks"
        )


SPLITS: dict[str, Callable[[int, int], VocabSplit]] = {
    "even": even_split,
    "balanced": balanced_split,
}


def split_vocab(vocab: int, world: int, kind: str = "balanced") -> VocabSplit:
    """The split named ``kind`` (a key of `SPLITS`)."""
    try:
        fn = SPLITS[kind]
    except KeyError:
        raise GradlensError(unknown_name_message("vocabulary split", kind, list(SPLITS))) from None
    return fn(vocab, world)
