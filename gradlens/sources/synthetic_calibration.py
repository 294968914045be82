"""The entropy calibration of the chunked synthetic source, tile by tile: no [M, V] tensor.

The synthetic source scales its lm_head W = c·W0 so that the mean entropy of π_θ over the M valid
tokens hits a target (`gradlens.sources.synthetic_chunked` builds the rest). With the unscaled
logits z⁰ = h·W0ᵀ cut into tiles of ``ROW_TILE`` tokens × ``VOCAB_BLOCK`` vocabulary rows, and
d = c·z⁰ − max_v c·z⁰ per token within a block, each block b gives per token

    S_b = Σ_v e^d,   U_b = Σ_v e^d·d,   Q_b = Σ_v e^d·d²,

which combine over blocks, in block order, against the running maximum (a block whose maximum
lies δ ≤ 0 below it enters as e^δ·(S_b, U_b + δS_b, Q_b + 2δU_b + δ²S_b)). With d taken against
the overall maximum,

    H_t = log S − U/S,       dH_t/d log c = −Var_π(c·z⁰) = −(Q/S − (U/S)²),

so one sweep over the tiles gives the mean entropy H̄(c) and its slope. H̄ falls monotonically
from log V (c = 0) towards 0, and `calibrate` runs Newton's method in log c inside a bracket
[lo, hi] that always holds the root: a step that would leave the bracket (or a step while it is
still open) is replaced by the geometric midpoint (or by ×4, ÷4). It stops when
|H̄(c) − target| ≤ ``ENTROPY_TOL`` as evaluated. A first calibration on the first
``START_TOKENS`` tokens alone, to ``START_TOL``, gives the full one a start a few per cent
from the root, from which it needs two or three sweeps (the first computes the tiles).

The tiles are kept between sweeps, in block-major order, while they fit the memory budget, and
recomputed otherwise: the same GEMM on the same operands gives the same numbers, so the budget
changes the time, not the result.

Precision: tiles in float32 (float64 for float64 operands), every per-token sum combined in
float64. The float32 terms carry a relative rounding of ~1e-7 into H̄, ten times below
``ENTROPY_TOL``. Arguments of exp are clamped at ``EXP_FLOOR`` = −80: e^−80 ≈ 2e-35 is below
the float32 and float64 resolution of any of these sums (each holds the block maximum's
e^0 = 1), and exp of a float32 argument below −87 (a subnormal or zero result) runs about a
hundred times slower on x86 than in the normal range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

VOCAB_BLOCK = 2048  # vocabulary rows per block: the unit of the random streams and reductions
ROW_TILE = 256  # valid tokens per tile
EXP_FLOOR = -80.0  # exp arguments are clamped here (module docstring)
ENTROPY_TOL = 1e-6  # nats: |mean entropy − target| at which the calibration stops
START_TOKENS = 64  # tokens of the first, cheap calibration that starts the full one
START_TOL = 1e-3  # nats: where that first calibration stops
MAX_LOG_STEP = math.log(4.0)  # the largest step in log c
MAX_SWEEPS = 200  # a cap only: the bracket is narrower than 1e-12·c long before

F64 = torch.float64


def spans(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) pieces of ``size`` covering range(total)."""
    return [(s, min(s + size, total)) for s in range(0, total, size)]


class Scratch:
    """Reusable buffers for a sweep's tile-sized temporaries (a large tensor allocated afresh
    for every tile costs its page faults every time)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A contiguous tensor of ``shape`` (uninitialised), the same memory on every call."""
        n = math.prod(shape)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self.buffers[(name, dtype)] = buf
        return buf[:n].view(shape)


class Moments:
    """Per-token (max, S, U, Q) of the module docstring, combined over blocks in block order."""

    def __init__(self, m: int) -> None:
        self.max = torch.full((m,), -math.inf, dtype=F64)
        self.s, self.u, self.q = (torch.zeros(m, dtype=F64) for _ in range(3))

    def add(self, rows: slice, mb: Tensor, sb: Tensor, ub: Tensor, qb: Tensor) -> None:
        """Fold in one block's sums (taken against its own maximum ``mb``) for ``rows``."""
        m0, s, u, q = self.max[rows], self.s[rows], self.u[rows], self.q[rows]
        new = torch.maximum(m0, mb)
        first = s == 0  # no block folded in yet (S ≥ 1 after one)
        a = torch.where(first, 0.0, m0 - new)  # shift of the running sums, ≤ 0
        b = mb - new  # shift of the block's sums, ≤ 0
        wa = torch.where(first, 0.0, torch.exp(a))
        wb = torch.exp(b)
        self.q[rows] = wa * (q + 2 * a * u + a * a * s) + wb * (qb + 2 * b * ub + b * b * sb)
        self.u[rows] = wa * (u + a * s) + wb * (ub + b * sb)
        self.s[rows] = wa * s + wb * sb
        self.max[rows] = new

    def entropy_and_slope(self) -> tuple[float, float]:
        """Mean over tokens of H_t = log S − U/S and of dH_t/d log c = −(Q/S − (U/S)²)."""
        mean_d = self.u / self.s
        entropy = torch.log(self.s) - mean_d
        variance = (self.q / self.s - mean_d * mean_d).clamp(min=0.0)
        return float(entropy.mean()), float(-variance.mean())


class LogitTiles:
    """z⁰ = h·W0ᵀ tile by tile, block-major, each with its per-token maximum; the first sweep
    that may keep tiles keeps them while they fit ``budget`` bytes."""

    def __init__(self, hidden: Tensor, weight0: Tensor, budget: int) -> None:
        self.hidden = hidden  # [M, H] in the tiles' dtype
        self.weight0 = weight0  # [V, H] W0 (any dtype: cast block by block)
        self.rows = spans(hidden.shape[0], ROW_TILE)
        self.blocks = spans(weight0.shape[0], VOCAB_BLOCK)
        self.budget = budget
        self.kept: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.filled = False
        self.scratch = Scratch()

    @property
    def kept_bytes(self) -> int:
        return sum(z.numel() * z.element_size() for z, _ in self.kept.values())

    def tiles(self, keep: bool = True) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """(rows, z⁰ [R, Vb], max_v z⁰ [R, 1]) for every tile, block-major. A tile that is not
        kept lives in a scratch buffer until the next one is produced."""
        keep = keep and not self.filled
        used = 0
        for b, (v0, v1) in enumerate(self.blocks):
            w0 = None
            for r, (r0, r1) in enumerate(self.rows):
                if (b, r) in self.kept:
                    z0, z0_max = self.kept[(b, r)]
                else:
                    if w0 is None:  # [Vb, H] (a view when no cast)
                        w0 = self.weight0[v0:v1].to(self.hidden.dtype)
                    nbytes = (r1 - r0) * (v1 - v0) * self.hidden.element_size()
                    if keep and used + nbytes <= self.budget:
                        z0 = self.hidden[r0:r1] @ w0.T
                        z0_max = z0.amax(-1, keepdim=True)
                        self.kept[(b, r)] = (z0, z0_max)
                        used += nbytes
                    else:
                        out = self.scratch.get("z0", (r1 - r0, v1 - v0), self.hidden.dtype)
                        z0 = torch.matmul(self.hidden[r0:r1], w0.T, out=out)
                        z0_max = z0.amax(-1, keepdim=True)
                yield slice(r0, r1), z0, z0_max
        self.filled = self.filled or keep

    def entropy(self, c: float) -> tuple[float, float]:
        """H̄(c) and dH̄/d log c for softmax(c·z⁰) over the tokens: one sweep."""
        moments = Moments(self.hidden.shape[0])
        for rows, z0, z0_max in self.tiles():
            shape, dtype = tuple(z0.shape), z0.dtype
            block_max = z0_max * c  # [R, 1], = max_v c·z⁰ (c > 0)
            d = torch.mul(z0, c, out=self.scratch.get("d", shape, dtype))
            d.sub_(block_max).clamp_(min=EXP_FLOOR)  # d ≤ 0
            e = torch.exp(d, out=self.scratch.get("e", shape, dtype))
            s = e.sum(-1)
            u = torch.linalg.vecdot(e, d)
            q = torch.linalg.vecdot(e.mul_(d), d)
            moments.add(rows, block_max.squeeze(-1).to(F64), s.to(F64), u.to(F64), q.to(F64))
        return moments.entropy_and_slope()


def calibrate(
    evaluate: Callable[[float], tuple[float, float]],
    target: float,
    start: float,
    tol: float = ENTROPY_TOL,
) -> tuple[float, int]:
    """(c, evaluations): a c > 0 with |H̄(c) − target| ≤ ``tol``, for H̄ decreasing in c with
    H̄(0) > target > H̄(∞); ``evaluate(c)`` returns (H̄(c), dH̄/d log c). Safeguarded Newton in
    log c (module docstring); it also stops when the bracket is narrower than 1e-12·c."""
    lo, hi, c = 0.0, math.inf, start
    for evaluation in range(1, MAX_SWEEPS + 1):
        entropy, slope = evaluate(c)
        err = entropy - target
        if abs(err) <= tol:
            return c, evaluation
        if err > 0:
            lo = c
        else:
            hi = c
        if lo > 0 and hi < math.inf and hi - lo <= 1e-12 * hi:
            return c, evaluation
        step = -err / slope if slope < 0 else math.nan
        candidate = c * math.exp(max(-MAX_LOG_STEP, min(MAX_LOG_STEP, step)))
        if not lo < candidate < hi:  # NaN fails this too
            if hi == math.inf:
                candidate = 4.0 * c
            elif lo == 0.0:
                candidate = hi / 4.0
            else:
                candidate = math.sqrt(lo * hi)
        c = candidate
    return c, MAX_SWEEPS


def entropy_scale_chunked(
    hidden: Tensor, weight0: Tensor, target: float, budget: int
) -> tuple[float, int, LogitTiles]:
    """(c, full sweeps, the tiles, with those kept): the c > 0 at which the mean entropy of
    softmax(c·h·W0ᵀ) over the rows of ``hidden`` [M, H] is ``target``, from a start at the
    first ``START_TOKENS`` tokens' own c. ``budget``: bytes for kept tiles."""
    start = 1.0 / math.sqrt(hidden.shape[1])  # W0/√H: logits of the size of h's entries
    m = hidden.shape[0]
    if m > START_TOKENS:
        few = hidden[:START_TOKENS]
        few_bytes = START_TOKENS * weight0.shape[0] * hidden.element_size()
        subset = LogitTiles(few, weight0, budget if few_bytes <= budget // 4 else 0)
        start, _ = calibrate(subset.entropy, target, start, START_TOL)
        del subset
    tiles = LogitTiles(hidden, weight0, budget)
    c, sweeps = calibrate(tiles.entropy, target, start)
    return c, sweeps, tiles
