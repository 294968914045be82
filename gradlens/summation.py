"""Sums whose rounding does not depend on the device's reduction kernel.

A reduction kernel chooses its own order, and the order sets the rounding. torch's CPU
log_softmax, for one, adds the exponentials of a row in a single SIMD accumulator whose L lanes
(8 or 16 float32 lanes) each add V/L terms one after the other: a bound linear in V, and with
many small terms of one sign (a softmax's) the roundings do not cancel. A CUDA kernel, or the
next torch release, sums in another order. gradlens fixes the order where a check depends on it.

`pairwise_sum` adds the last (or a given) dimension in float64: blocks of B = 8 consecutive
terms, each block's terms added one after the other in float64 (`block_sums`: at most B − 1 = 7
additions per term, and the bound below holds for any order of them), then the block sums by
halving, the first half plus the second half, elementwise, until one entry is left (an
odd entry out waits a round). Every term goes through at most 7 + ⌈log2 ⌈n/8⌉⌉ ≤ ⌈log2 n⌉ + 4
additions (`depth`), each one correctly rounded on every device, so

    |fl(Σ_i x_i) − Σ_i x_i| ≤ depth(n)·u64·Σ_i |x_i|        (u64 = 2⁻⁵³; first order in u64)

whatever the kernels (Higham, Accuracy and Stability of Numerical Algorithms, §4.2). Float32
terms are converted exactly, so for them this is ~2⁻⁴⁸ relative at n = 2¹⁸, far below float32's
own rounding. (The blocks make the float64 conversion one pass: halving all n terms costs about
twice as much, for 4 fewer levels. The blocks are added as B slices of the whole tensor, the
float32 terms converted as they are read: a float64 reduction over a dimension other than the
last costs several times more on a CPU.)

`Cascade` extends this across chunks: it holds at most one partial result per level and merges
two of one level into the next (a binary counter), so a result made of n chunks has been
through at most ⌊log2 n⌋ + 1 merges, however big the chunks. A sum of V terms cut into chunks of
any size V_c therefore goes through at most depth(V_c) + ⌊log2 n⌋ + 1 ≤ ⌈log2 V⌉ + 7 additions
per term (`chunked_depth`; ⌈log2 V_c⌉ + ⌊log2 n⌋ ≤ ⌈log2 V⌉ + 1 for n = ⌈V/V_c⌉ chunks): the
bound depends on V only, not on the chunking. (Counted over every n and chunk size up to
V = 1,200, the most is ⌈log2 V⌉ + 5: `chunked_depth` keeps two levels spare, one of which the
vocab-parallel engine's sum over ranks uses.)

Sums over the ranks of a process group (`gradlens.engine.vocab_parallel`) must not add a level
per rank. Where every rank's part is at hand, `compensated_sum` adds P parts in rank order with
the error of one rounding (Ogita, Rump and Oishi's Sum2: TwoSum at each step, the errors summed
and added back; |result − Σ| ≤ u64·|Σ| + γ²_{P−1}·Σ|x_r|). Where a backend's all_reduce adds
them in an order of its own, `grid_parts` splits each part x_r = hi_r + lo_r exactly with hi_r on
a grid coarse enough that any sum of P of them is exact, whatever the order; the lo_r are
below the grid's step, so their sum's rounding is of second order, and `join` rounds once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

from gradlens.vector_math import initialise_vector_math

# Every computation of gradlens (compare, sweep, trace, the API) imports this module before it
# runs: MKL's vector math is initialised here, on one thread (gradlens.vector_math).
initialise_vector_math()

WIDE = torch.float64  # the dtype of every sum made here
BLOCK = 8  # terms summed by one float64 reduction before the halving

T = TypeVar("T")


def log2_ceil(n: int) -> int:
    """⌈log2 n⌉ (0 for n ≤ 1)."""
    return (n - 1).bit_length() if n > 1 else 0


def depth(n: int) -> int:
    """The most additions a term of an n-term `pairwise_sum` goes through:
    min(n, B) − 1 + ⌈log2 ⌈n/B⌉⌉ ≤ ⌈log2 n⌉ + 4."""
    if n <= 1:
        return 0
    return min(n, BLOCK) - 1 + log2_ceil(-(-n // BLOCK))


def chunked_depth(n: int) -> int:
    """⌈log2 n⌉ + 7: the most additions a term goes through when n terms are summed in chunks
    of any size with `pairwise_sum` and the chunk sums with `Cascade`."""
    return log2_ceil(n) + 7


def pairwise_sum(x: Tensor, dim: int = -1) -> Tensor:
    """Σ of ``x`` over ``dim`` in float64, by blocks of `BLOCK` then halving; ``dim`` is
    removed."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n <= 1:
        return x.to(WIDE).sum(dim)  # the entry itself, or zeros of the right shape
    if n % BLOCK:
        shape = list(x.shape)
        shape[dim] = BLOCK - n % BLOCK
        x = torch.cat([x, x.new_zeros(shape)], dim)
    return halving_sum(block_sums(x, dim), dim)


def block_sums(x: Tensor, dim: int) -> Tensor:
    """`pairwise_sum`'s first stage: the float64 sums of each `BLOCK` consecutive entries along
    ``dim`` (its length a multiple of `BLOCK`), the block's entries added in sequence."""
    blocks = x.unflatten(dim, (-1, BLOCK))  # the entries of a block along dim + 1
    out = blocks.select(dim + 1, 0).to(WIDE, copy=True)  # never a view of x
    for i in range(1, BLOCK):
        out.add_(blocks.select(dim + 1, i))  # float32 entries converted exactly, added in float64
    return out


def halving_sum(x: Tensor, dim: int = -1) -> Tensor:
    """`pairwise_sum`'s second stage: Σ over ``dim`` of float64 block sums by halving (the
    first half plus the second, an odd entry out waiting a round); ``dim`` is removed. The
    fused engine's kernels write the block sums and add them with this."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n == 0:
        return x.sum(dim)
    while n > 1:
        h = n // 2
        halves = x.narrow(dim, 0, h) + x.narrow(dim, h, h)
        x = torch.cat([halves, x.narrow(dim, 2 * h, 1)], dim) if n % 2 else halves
        n = x.shape[dim]
    return x.squeeze(dim)


class Cascade(Generic[T]):
    """A running combination of chunk results, merged pairwise (a binary counter).

    ``merge(a, b)`` combines two results; it should be the same operation whichever comes
    first. `result` merges what is left, the lowest levels first.
    """

    def __init__(self, merge: Callable[[T, T], T]) -> None:
        self._merge = merge
        self._levels: list[T | None] = []

    def add(self, item: T) -> None:
        for level, held in enumerate(self._levels):
            if held is None:
                self._levels[level] = item
                return
            item = self._merge(held, item)
            self._levels[level] = None
        self._levels.append(item)

    def result(self) -> T | None:
        """The combination of everything added; None if nothing was."""
        out: T | None = None
        for held in self._levels:
            if held is not None:
                out = held if out is None else self._merge(held, out)
        return out


def add(a: Tensor, b: Tensor) -> Tensor:
    return a + b


class PairwiseSum:
    """Σ over chunks of float64 partial sums, with the `Cascade` order (zeros of ``shape``
    when nothing was added)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self._cascade: Cascade[Tensor] = Cascade(add)
        self._zeros = torch.zeros(shape, dtype=WIDE, device=device)

    def add(self, part: Tensor) -> None:
        self._cascade.add(part.to(WIDE))

    def total(self) -> Tensor:
        out = self._cascade.result()
        return self._zeros.clone() if out is None else out


def compensated_sum(x: Tensor, dim: int = 0) -> Tensor:
    """Σ of ``x`` over ``dim`` (in order) in float64 with the error of one rounding, to first
    order (Sum2: each step's rounding error recovered by TwoSum, their sum added at the end)."""
    parts = x.to(WIDE).unbind(dim)
    total, carry = parts[0], torch.zeros_like(parts[0])
    for part in parts[1:]:
        s = total + part
        back = s - total  # TwoSum: s + err = total + part exactly
        err = (total - (s - back)) + (part - back)
        total, carry = s, carry + err
    return total + carry


def grid_parts(x: Tensor, bound: float, terms: int) -> tuple[Tensor, Tensor]:
    """x = hi + lo exactly (float64), hi a multiple of q = 2^(⌈log2(terms·bound)⌉ − 52) and
    |lo| ≤ q/2: for |x| ≤ ``bound``, any sum of ``terms`` such hi is exact in float64 in any
    order (each partial sum is a multiple of q below 2⁵³·q)."""
    x = x.to(WIDE)
    q = 2.0 ** (log2_ceil(math.ceil(terms * bound)) - 52)
    hi = torch.round(x / q) * q  # dividing and multiplying by a power of 2: exact
    return hi, x - hi  # x − hi is a multiple of x's ulp below q: exact


def join(hi: Tensor, lo: Tensor) -> Tensor:
    """The sum of `grid_parts`' halves after they were summed: one rounding."""
    return hi + lo
