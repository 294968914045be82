"""Triton kernels of the fused lm_head engine: the element-wise work and reductions between GEMMs.

The GEMMs stay in torch (cuBLAS on a GPU). Each kernel here replaces a chain of element-wise
torch operations of the streamed engine (`gradlens.engine.streamed`) on one block: it reads the
block once, keeps the intermediates in registers and accumulates per-token or per-row
statistics in the softmax dtype (float32; float64 for float64 operands). A program owns
``token_rows`` tokens (or ``vocab_rows`` vocabulary rows) and loops over the other dimension
in tiles. `gradlens.engine.fused` drives them; the maths is in its docstring.

``normaliser_chunk`` (pass 1, per [M, Vc] logits chunk z): the chunk's softmax normaliser per
token, as `gradlens.logits.normaliser` forms it: m = max_v z_v in a first sweep over the tiles,
then e_v = exp(z_v − m) in the softmax dtype and, for the entropy bonus, e_v·(z_v − m), each
summed in float64 by blocks of 8 consecutive columns (`gradlens.summation`'s first stage); the
caller adds the [M, ⌈Vc/8⌉] block sums by halving, so that S and T go through the same
additions as the streamed engine's (not a sequential running sum over tiles, whose rounding
would grow with Vc). The same sweeps give max_v |z_v| and, in the chunk that holds y_t, z_y.

``probs_chunk`` (pass 2, per chunk): from z and the global normaliser (m and fl(log S)),
log π = (z − m) − log S and π = exp(log π) (the streamed engine's two roundings), and writes the
GEMM operand P = π − e_y (the sampled-row correction folded in, so that Pᵀ[c⊙h] = −∂L/∂W rows
with no separate index_add); accumulates −Σ_v π log π and max_{v≠y} π, and writes the float64
block sums of π for Σ_v π. With the entropy bonus it writes E = w·π·(log π + H) and its block
sums for Σ_v E and accumulates, for every loss i carrying the bonus at once, Σ_{v≠y}
|E_v − c_i π_v| and max_{v≠y} |E_v − c_i π_v|.

``row_stats`` (pass 2, per loss and chunk): the loss's row block r = −D (− Δ) (+ B) of the
[Vc, ·] GEMM results (D: its dense product with the sampled rows included; Δ: a shared
product's correction; B: the entropy bonus's Eᵀh), each element read once: the row norms
‖r_v‖ and the float64 column sums of each block of 8 rows, which the caller adds by halving
into Σ_v r_v.

The exponentials are CUDA's libdevice exp (expf within 2 ulp, as the zero-sum bound assumes;
`tl.exp` compiles float32 to ex2.approx of z·log2 e, whose error grows with |z − m|), and
numpy's under the interpreter, which has no libdevice.

Triton is optional: CUDA builds of torch ship it, ``pip install 'gradlens[gpu]'`` installs it
elsewhere. Without it this module still imports, ``AVAILABLE`` is False and the kernels are
plain functions that nothing calls. With ``TRITON_INTERPRET=1`` in the environment when Triton
is first imported (Triton decides then, for its own library functions too), the kernels run
under Triton's interpreter (numpy, on the CPU): that is how the tests check their logic
without a GPU (tests/conftest.py sets it on machines without CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradlens.engine.norms import repair_norms
from gradlens.errors import GradlensError
from gradlens.summation import BLOCK, WIDE

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
except ImportError:  # the optional extra is not installed: nothing here can run
    triton = None
    tl = None
    libdevice = None

AVAILABLE = triton is not None
# whether Triton runs kernels in its interpreter: fixed when Triton is imported, as above
INTERPRETING = AVAILABLE and bool(triton.knobs.runtime.interpret)
# the float64 block sums are summation.BLOCK = 8 columns (or rows) wide, written as 8 in the
# kernels; every column or row tile is a multiple of it
assert BLOCK == 8


def _jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit` when Triton is installed (launched as ``kernel[grid](…)``); otherwise the
    function itself, which nothing calls."""
    return triton.jit(fn) if AVAILABLE else fn


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of 2), each capped at the power of 2 that covers its dimension.

    ``token_rows`` × ``vocab_cols``: the [M, Vc] tiles of the two chunk kernels;
    ``vocab_rows`` × ``hidden_cols``: the [Vc, H] tiles of ``row_stats``. The defaults are not
    tuned on a GPU (none was available); they are the largest tiles that Triton compiled for
    sm_90 without spilling registers (one token row per program, as softmax kernels do: the
    register count grows fast with rows per tile).
    """

    token_rows: int = 1
    vocab_cols: int = 1024
    vocab_rows: int = 8
    hidden_cols: int = 256
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("token_rows", "vocab_cols", "vocab_rows", "hidden_cols", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise GradlensError(f"blocks.{name}: {value} is not a power of 2 (1, 2, 4, …)")


@_jit
def _exp_libdevice(x):
    return libdevice.exp(x)


@_jit
def _exp_interpreted(x):
    return tl.exp(x)


# exp in the kernels: libdevice's when compiled, numpy's under the interpreter (module docstring)
_exp = _exp_interpreted if INTERPRETING else _exp_libdevice


@dataclass
class ChunkNormaliser:
    """Pass 1's per-chunk output: the chunk's max [M] and the float64 block sums [M, ⌈Vc/8⌉]
    of e^{z − m} (and of e^{z − m}(z − m) for the entropy bonus)."""

    max: Tensor
    sum_blocks: Tensor
    tilt_blocks: Tensor | None


@dataclass
class ProbStats:
    """Pass 2's per-token accumulators, updated in place chunk by chunk."""

    entropy: Tensor  # [M] −Σ_v π log π
    max_other: Tensor  # [M] max_{v≠y} π
    other_mass: Tensor  # [n, M] Σ_{v≠y} |E − c_i π| for the n losses carrying the bonus
    other_max: Tensor  # [n, M] max_{v≠y} |E − c_i π|

    @classmethod
    def empty(
        cls, tokens: int, bonus_losses: int, dtype: torch.dtype, device: torch.device
    ) -> ProbStats:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        n = max(bonus_losses, 1)  # a placeholder row when no loss carries the bonus
        return cls(zeros(tokens), zeros(tokens), zeros(n, tokens), zeros(n, tokens))


@_jit
def _normaliser_chunk(
    z_ptr,
    stride_z,
    tokens_ptr,
    start,
    width,
    n_tokens,
    max_ptr,
    z_y_ptr,
    max_abs_ptr,
    sum_ptr,
    tilt_ptr,
    stride_blocks,
    n_blocks,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < n_tokens
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z  # [BLOCK_M, 1] row starts
    m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    big = tl.load(max_abs_ptr + rows, mask=live, other=0.0)
    for c0 in range(0, width, BLOCK_V):  # the chunk's max (and max |z|)
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = live[:, None] & (cols[None, :] < width)
        z = tl.load(base + cols[None, :], mask=inside, other=float("-inf")).to(ACC)
        big = tl.maximum(big, tl.max(tl.where(inside, tl.abs(z), 0.0), axis=1))
        m = tl.maximum(m, tl.max(z, axis=1))
    out = rows.to(tl.int64)[:, None] * stride_blocks  # [BLOCK_M, 1] rows of the block sums
    for c0 in range(0, width, BLOCK_V):  # e^{z − m} and e^{z − m}(z − m), 8 columns a block
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = live[:, None] & (cols[None, :] < width)
        z = tl.load(base + cols[None, :], mask=inside, other=float("-inf")).to(ACC)
        finite = z > float("-inf")  # padding and −inf logits add nothing
        d = tl.where(finite, z - m[:, None], 0.0)  # z − m ≤ 0
        p = tl.where(finite, _exp(d), 0.0)
        bcols = c0 // 8 + tl.arange(0, BLOCK_V // 8)
        here = live[:, None] & (bcols[None, :] < n_blocks)
        blocks = tl.sum(tl.reshape(p.to(tl.float64), [BLOCK_M, BLOCK_V // 8, 8]), axis=2)
        tl.store(sum_ptr + out + bcols[None, :], blocks, mask=here)
        if ENTROPY:
            pd = tl.reshape((p * d).to(tl.float64), [BLOCK_M, BLOCK_V // 8, 8])
            tl.store(tilt_ptr + out + bcols[None, :], tl.sum(pd, axis=2), mask=here)
    tl.store(max_ptr + rows, m, mask=live)
    tl.store(max_abs_ptr + rows, big, mask=live)
    local = tl.load(tokens_ptr + rows, mask=live, other=-1) - start
    here_y = live & (local >= 0) & (local < width)
    z_y = tl.load(z_ptr + rows.to(tl.int64) * stride_z + local, mask=here_y, other=0.0)
    tl.store(z_y_ptr + rows, z_y.to(ACC), mask=here_y)


@_jit
def _probs_chunk(
    z_ptr,
    stride_z,
    p_ptr,
    stride_p,
    e_ptr,
    stride_e,
    tokens_ptr,
    start,
    width,
    n_tokens,
    max_ptr,
    log_sum_ptr,
    h_ptr,
    w_ptr,
    coef_ptr,
    stride_coef,
    n_bonus,
    mass_ptr,
    bonus_sum_ptr,
    stride_blocks,
    n_blocks,
    entropy_ptr,
    max_other_ptr,
    other_mass_ptr,
    other_max_ptr,
    stride_other,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < n_tokens
    r64 = rows.to(tl.int64)[:, None]
    m = tl.load(max_ptr + rows, mask=live, other=0.0)
    log_s = tl.load(log_sum_ptr + rows, mask=live, other=0.0)
    local = tl.load(tokens_ptr + rows, mask=live, other=-1) - start  # y_t within the chunk
    out = r64 * stride_blocks  # [BLOCK_M, 1] rows of the block sums
    ent = tl.zeros([BLOCK_M], dtype=ACC)
    top = tl.zeros([BLOCK_M], dtype=ACC)
    if ENTROPY:
        h = tl.load(h_ptr + rows, mask=live, other=0.0)
        w = tl.load(w_ptr + rows, mask=live, other=0.0)
    for c0 in range(0, width, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = live[:, None] & (cols[None, :] < width)
        sampled = cols[None, :] == local[:, None]
        logp = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=inside, other=0.0).to(ACC)
        logp = (logp - m[:, None]) - log_s[:, None]  # log π, rounded twice as in the engine
        pi = tl.where(inside, _exp(logp), 0.0)
        operand = pi - tl.where(sampled, 1.0, 0.0)  # π − e_y
        tl.store(p_ptr + r64 * stride_p + cols[None, :], operand.to(p_ptr.dtype.element_ty),
                 mask=inside)  # fmt: skip
        bcols = c0 // 8 + tl.arange(0, BLOCK_V // 8)
        here = live[:, None] & (bcols[None, :] < n_blocks)
        blocks = tl.sum(tl.reshape(pi.to(tl.float64), [BLOCK_M, BLOCK_V // 8, 8]), axis=2)
        tl.store(mass_ptr + out + bcols[None, :], blocks, mask=here)
        ent -= tl.sum(pi * logp, axis=1)
        top = tl.maximum(top, tl.max(tl.where(sampled, 0.0, pi), axis=1))
        if ENTROPY:
            e = w[:, None] * pi * (logp + h[:, None])  # 0 outside: π is
            tl.store(e_ptr + r64 * stride_e + cols[None, :], e.to(e_ptr.dtype.element_ty),
                     mask=inside)  # fmt: skip
            e_blocks = tl.sum(tl.reshape(e.to(tl.float64), [BLOCK_M, BLOCK_V // 8, 8]), axis=2)
            tl.store(bonus_sum_ptr + out + bcols[None, :], e_blocks, mask=here)
            for i in range(n_bonus):  # every loss that carries the bonus, from the same π, E
                c = tl.load(coef_ptr + i * stride_coef + rows, mask=live, other=0.0)
                g = tl.where(sampled, 0.0, tl.abs(e - c[:, None] * pi))  # |∂L_i/∂z_v|, v ≠ y
                at = i * stride_other + rows
                acc_mass = tl.load(other_mass_ptr + at, mask=live, other=0.0)
                tl.store(other_mass_ptr + at, acc_mass + tl.sum(g, axis=1), mask=live)
                acc_max = tl.load(other_max_ptr + at, mask=live, other=0.0)
                tl.store(other_max_ptr + at, tl.maximum(acc_max, tl.max(g, axis=1)), mask=live)
    acc_ent = tl.load(entropy_ptr + rows, mask=live, other=0.0)
    tl.store(entropy_ptr + rows, acc_ent + ent, mask=live)
    acc_top = tl.load(max_other_ptr + rows, mask=live, other=0.0)
    tl.store(max_other_ptr + rows, tl.maximum(acc_top, top), mask=live)


@_jit
def _row_stats(
    d_ptr,
    stride_d,
    delta_ptr,
    stride_delta,
    bonus_ptr,
    stride_bonus,
    norms_ptr,
    col_sum_ptr,
    width,
    hidden,
    n_blocks,
    DELTA: tl.constexpr,
    BONUS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    block = tl.program_id(0)
    rows = block * BLOCK_V + tl.arange(0, BLOCK_V)
    live = rows < width
    r64 = rows.to(tl.int64)[:, None]
    sq = tl.zeros([BLOCK_V], dtype=ACC)
    for c0 in range(0, hidden, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        inside = live[:, None] & (cols[None, :] < hidden)
        r = -tl.load(d_ptr + r64 * stride_d + cols[None, :], mask=inside, other=0.0).to(ACC)
        if DELTA:
            r -= tl.load(delta_ptr + r64 * stride_delta + cols[None, :], mask=inside, other=0.0)
        if BONUS:
            r += tl.load(bonus_ptr + r64 * stride_bonus + cols[None, :], mask=inside, other=0.0)
        sq += tl.sum(r * r, axis=1)
        # float64 column sums of each 8 rows: [BLOCK_V / 8, BLOCK_H]
        blocks = tl.sum(tl.reshape(r.to(tl.float64), [BLOCK_V // 8, 8, BLOCK_H]), axis=1)
        brows = block * (BLOCK_V // 8) + tl.arange(0, BLOCK_V // 8)
        at = col_sum_ptr + brows.to(tl.int64)[:, None] * hidden + cols[None, :]
        tl.store(at, blocks, mask=(brows[:, None] < n_blocks) & (cols[None, :] < hidden))
    tl.store(norms_ptr + rows, tl.sqrt(sq), mask=live)


def require() -> None:
    """Raise a `GradlensError` naming the extra to install when Triton is missing."""
    if not AVAILABLE:
        raise GradlensError(
            "engine 'fused': Triton is not installed; install it with pip install "
            "'gradlens[gpu]' (CUDA builds of torch ship it), or use engine 'streamed'"
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(size: int, dim: int) -> int:
    """``size`` capped at the smallest power of 2 ≥ ``dim``: no tile wider than its block."""
    return min(size, 1 << max(dim - 1, 0).bit_length())


def _acc(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def _wide_tile(size: int, dim: int) -> int:
    """`_tile`, at least `BLOCK` wide: the float64 block sums take whole tiles of 8."""
    return max(BLOCK, _tile(size, dim))


def normaliser_chunk(
    z: Tensor,
    tokens: Tensor,
    start: int,
    z_y: Tensor,
    max_abs: Tensor,
    entropy: bool,
    blocks: Blocks,
) -> ChunkNormaliser:
    """One [M, Vc] logits chunk (columns start … start + Vc − 1): its normaliser's max and block
    sums; z_y (where y_t falls in the chunk) and max |z| [M] are updated in place."""
    require()
    m, width = z.shape
    acc = max_abs.dtype
    n_blocks = _cdiv(width, BLOCK)
    top = torch.empty(m, dtype=acc, device=z.device)
    sums = torch.empty(m, n_blocks, dtype=WIDE, device=z.device)
    tilt = torch.empty(m, n_blocks, dtype=WIDE, device=z.device) if entropy else None
    if m == 0:
        return ChunkNormaliser(top, sums, tilt)
    z = z.contiguous()
    bm, bv = _tile(blocks.token_rows, m), _wide_tile(blocks.vocab_cols, width)
    _normaliser_chunk[(_cdiv(m, bm),)](
        z, z.stride(0), tokens, start, width, m,
        top, z_y, max_abs, sums, sums if tilt is None else tilt, sums.stride(0), n_blocks,
        ENTROPY=entropy, ACC=_acc(acc), BLOCK_M=bm, BLOCK_V=bv, num_warps=blocks.num_warps,
    )  # fmt: skip
    return ChunkNormaliser(top, sums, tilt)


@dataclass(frozen=True)
class Bonus:
    """The entropy bonus's inputs and output in pass 2."""

    out: Tensor  # [M, Vc] E = w·π·(log π + H), written by the kernel
    entropy: Tensor  # [M] H_t
    weight: Tensor  # [M] w_t = a_t·c_H
    coefficients: Tensor  # [n, M] c_i of the losses carrying the bonus (n ≥ 1 rows)
    losses: int  # n (0: no loss carries it; ``coefficients`` is then a placeholder row)


def probs_chunk(
    z: Tensor,
    tokens: Tensor,
    start: int,
    top: Tensor,
    log_sum: Tensor,
    operand: Tensor,
    stats: ProbStats,
    blocks: Blocks,
    bonus: Bonus | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Write P = π − e_y into ``operand`` [M, Vc] (π from the global normaliser's m = ``top``
    and fl(log S) = ``log_sum``, [M] each) and fold the chunk into ``stats``; with ``bonus``,
    also write E. Returns the float64 block sums [M, ⌈Vc/8⌉] of π and of E (None without the
    bonus)."""
    require()
    m, width = z.shape
    n_blocks = _cdiv(width, BLOCK)
    mass = torch.empty(m, n_blocks, dtype=WIDE, device=z.device)
    e_sums = None if bonus is None else torch.empty(m, n_blocks, dtype=WIDE, device=z.device)
    if m == 0:
        return mass, e_sums
    z = z.contiguous()
    if bonus is None:  # placeholders: the kernel compiled without the bonus never reads them
        e, h, w, coef, n_bonus = operand, top, top, stats.other_mass, 0
    else:
        e, h, w = bonus.out, bonus.entropy, bonus.weight
        coef, n_bonus = bonus.coefficients, bonus.losses
    bm, bv = _tile(blocks.token_rows, m), _wide_tile(blocks.vocab_cols, width)
    _probs_chunk[(_cdiv(m, bm),)](
        z, z.stride(0), operand, operand.stride(0), e, e.stride(0), tokens, start, width, m,
        top, log_sum, h, w, coef, coef.stride(0), n_bonus,
        mass, mass if e_sums is None else e_sums, mass.stride(0), n_blocks,
        stats.entropy, stats.max_other, stats.other_mass, stats.other_max,
        stats.other_mass.stride(0),
        ENTROPY=bonus is not None, ACC=_acc(top.dtype), BLOCK_M=bm, BLOCK_V=bv,
        num_warps=blocks.num_warps,
    )  # fmt: skip
    return mass, e_sums


def row_stats(
    dense: Tensor,
    norms: Tensor,
    blocks: Blocks,
    delta: Tensor | None = None,
    bonus: Tensor | None = None,
) -> Tensor:
    """r = −dense (− delta) (+ bonus), [Vc, H] each: ``norms`` [Vc] ← ‖r_v‖; returns the float64
    column sums of each 8 rows [⌈Vc/8⌉, H], which `summation.halving_sum` adds into Σ_v r_v.
    ``dense`` may be a column slice of a wider GEMM result (unit column stride)."""
    require()
    width, hidden = dense.shape
    n_blocks = _cdiv(width, BLOCK)
    partial = torch.empty(n_blocks, hidden, dtype=WIDE, device=norms.device)
    if width == 0:
        return partial
    bv, bh = _wide_tile(blocks.vocab_rows, width), _tile(blocks.hidden_cols, hidden)
    d2, b2 = delta, bonus  # placeholders below when absent: the kernel never reads them
    _row_stats[(_cdiv(width, bv),)](
        dense, dense.stride(0),
        dense if d2 is None else d2, dense.stride(0) if d2 is None else d2.stride(0),
        dense if b2 is None else b2, dense.stride(0) if b2 is None else b2.stride(0),
        norms, partial, width, hidden, n_blocks,
        DELTA=d2 is not None, BONUS=b2 is not None, ACC=_acc(norms.dtype),
        BLOCK_V=bv, BLOCK_H=bh, num_warps=blocks.num_warps,
    )  # fmt: skip

    def rebuilt(index: Tensor) -> Tensor:  # the rows r the kernel summed, at ``index``
        r = -dense[index].to(norms.dtype)
        if delta is not None:
            r -= delta[index].to(norms.dtype)
        if bonus is not None:
            r += bonus[index].to(norms.dtype)
        return r

    repair_norms(norms, rebuilt)  # the squares of tiny rows underflow in the kernel too
    return partial
