"""Sums whose rounding does not depend on the device's reduction kernel.

A reduction kernel chooses its own order, and the order sets the rounding. torch's CPU
log_softmax, for one, adds the exponentials of a row in a single SIMD accumulator whose L lanes
(8 or 16 float32 lanes) each add V/L terms one after the other: a bound linear in V, and with
many small terms of one sign (a softmax's) the roundings do not cancel. A CUDA kernel, or the
next torch release, sums in another order. gradlens fixes the order where a check depends on it.

`pairwise_sum` adds the last (or a given) dimension in float64: blocks of B = 8 consecutive
terms by a float64 reduction (any order: at most B − 1 = 7 additions per term), then the block
sums by halving, the first half plus the second half, elementwise, until one entry is left (an
odd entry out waits a round). Every term goes through at most 7 + ⌈log2 ⌈n/8⌉⌉ ≤ ⌈log2 n⌉ + 4
additions (`depth`), each one correctly rounded on every device, so

    |fl(Σ_i x_i) − Σ_i x_i| ≤ depth(n)·u64·Σ_i |x_i|        (u64 = 2⁻⁵³; first order in u64)

whatever the kernels (Higham, Accuracy and Stability of Numerical Algorithms, §4.2). Float32
terms are converted exactly, so for them this is ~2⁻⁴⁸ relative at n = 2¹⁸, far below float32's
own rounding. (The blocks make the float64 conversion one pass: halving all n terms costs about
twice as much, for 4 fewer levels.)

`Cascade` extends this across chunks: it holds at most one partial result per level and merges
two of one level into the next (a binary counter), so a result made of n chunks has been
through at most ⌊log2 n⌋ + 1 merges, however big the chunks. A sum of V terms cut into chunks of
any size V_c therefore goes through at most depth(V_c) + ⌊log2 n⌋ + 1 ≤ ⌈log2 V⌉ + 7 additions
per term (`chunked_depth`; ⌈log2 V_c⌉ + ⌊log2 n⌋ ≤ ⌈log2 V⌉ + 1 for n = ⌈V/V_c⌉ chunks): the
bound depends on V only, not on the chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

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
    x = x.unflatten(dim, (-1, BLOCK)).sum(dim + 1, dtype=WIDE)  # [..., ⌈n/B⌉, ...]
    n = x.shape[dim]
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
