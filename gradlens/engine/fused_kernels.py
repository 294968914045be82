"""Triton kernels of the fused lm_head engine: the element-wise work and reductions between GEMMs.

The GEMMs stay in torch (cuBLAS on a GPU). Each kernel here replaces a chain of element-wise
torch operations of the streamed engine (`gradlens.engine.streamed`) on one block: it reads the
block once, keeps the intermediates in registers and accumulates per-token or per-row
statistics in the softmax dtype (float32; float64 for float64 operands). A program owns
``token_rows`` tokens (or ``vocab_rows`` vocabulary rows) and loops over the other dimension
in tiles. `gradlens.engine.fused` drives them; the maths is in its docstring.

``logsumexp_chunk`` (pass 1, per [M, Vc] logits chunk z): an online logsumexp per token. The
state is the running maximum m, S = Σ_v e^{z_v − m} and, for the entropy bonus,
U = Σ_v e^{z_v − m}(z_v − m); a tile with a larger maximum m' rescales them:

    S ← e^{m − m'} S + Σ_tile e^{z − m'},
    U ← e^{m − m'} (U + (m − m') S) + Σ_tile e^{z − m'}(z − m').

After the last chunk lse = m + log S and H = −Σ_v π_v log π_v = log S − U / S (U/S is the
π-weighted mean of z − m ≤ 0, so both terms are ≥ 0 and nothing cancels). The same read gives
max_v |z_v| and, in the chunk that holds y_t, z_y.

``probs_chunk`` (pass 2, per chunk): from z and the lse, π = exp(z − lse) and writes the GEMM
operand P = π − e_y (the sampled-row correction folded in, so that Pᵀ[c⊙h] = −∂L/∂W rows with
no separate index_add), accumulates Σ_v π, −Σ_v π log π and max_{v≠y} π, and with the entropy
bonus writes E = w·π·(log π + H), accumulates Σ_v E and, for every loss i carrying the bonus at
once, Σ_{v≠y} |E_v − c_i π_v| and max_{v≠y} |E_v − c_i π_v|.

``row_stats`` (pass 2, per loss and chunk): the loss's row block r = −D (− Δ) (+ B) of the
[Vc, ·] GEMM results (D: its dense product with the sampled rows included; Δ: a shared
product's correction; B: the entropy bonus's Eᵀh), each element read once: the row norms
‖r_v‖ and per-program partial column sums, summed into Σ_v r_v by the caller.

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

from gradlens.errors import GradlensError

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra is not installed: nothing here can run
    triton = None
    tl = None

AVAILABLE = triton is not None
# whether Triton runs kernels in its interpreter: fixed when Triton is imported, as above
INTERPRETING = AVAILABLE and bool(triton.knobs.runtime.interpret)


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


@dataclass
class LogsumexpState:
    """Pass 1's running per-token state, [M] each, updated in place chunk by chunk."""

    max: Tensor  # m: the largest logit seen (finfo.min before the first chunk)
    sum: Tensor  # S = Σ_v e^{z_v − m}
    shifted: Tensor  # U = Σ_v e^{z_v − m}(z_v − m), with the entropy bonus only
    z_y: Tensor  # the sampled token's logit
    max_abs: Tensor  # max_v |z_v|

    @classmethod
    def empty(cls, tokens: int, dtype: torch.dtype, device: torch.device) -> LogsumexpState:
        def zeros() -> Tensor:
            return torch.zeros(tokens, dtype=dtype, device=device)

        # a finite start for m: e^{m − m'} is then 0, never NaN, before the first logit
        start = torch.full((tokens,), torch.finfo(dtype).min, dtype=dtype, device=device)
        return cls(start, zeros(), zeros(), zeros(), zeros())

    def lse(self) -> Tensor:
        return self.max + self.sum.log()

    def entropy(self) -> Tensor:
        """H = log S − U/S (both terms ≥ 0)."""
        return self.sum.log() - self.shifted / self.sum


@dataclass
class ProbStats:
    """Pass 2's per-token accumulators, updated in place chunk by chunk."""

    prob_sum: Tensor  # [M] Σ_v π
    entropy: Tensor  # [M] −Σ_v π log π
    max_other: Tensor  # [M] max_{v≠y} π
    bonus_sum: Tensor  # [M] Σ_v E (entropy bonus only)
    other_mass: Tensor  # [n, M] Σ_{v≠y} |E − c_i π| for the n losses carrying the bonus
    other_max: Tensor  # [n, M] max_{v≠y} |E − c_i π|

    @classmethod
    def empty(
        cls, tokens: int, bonus_losses: int, dtype: torch.dtype, device: torch.device
    ) -> ProbStats:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        n = max(bonus_losses, 1)  # a placeholder row when no loss carries the bonus
        return cls(zeros(tokens), zeros(tokens), zeros(tokens), zeros(tokens), zeros(n, tokens),
                   zeros(n, tokens))  # fmt: skip


@_jit
def _logsumexp_chunk(
    z_ptr,
    stride_z,
    tokens_ptr,
    start,
    width,
    n_tokens,
    max_ptr,
    sum_ptr,
    shifted_ptr,
    z_y_ptr,
    max_abs_ptr,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < n_tokens
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z  # [BLOCK_M, 1] row starts
    m = tl.load(max_ptr + rows, mask=live, other=0.0)
    s = tl.load(sum_ptr + rows, mask=live, other=0.0)
    u = tl.load(shifted_ptr + rows, mask=live, other=0.0)
    big = tl.load(max_abs_ptr + rows, mask=live, other=0.0)
    for c0 in range(0, width, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = live[:, None] & (cols[None, :] < width)
        z = tl.load(base + cols[None, :], mask=inside, other=float("-inf")).to(ACC)
        big = tl.maximum(big, tl.max(tl.where(inside, tl.abs(z), 0.0), axis=1))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        finite = z > float("-inf")  # padding and −inf logits add nothing
        d = tl.where(finite, z - m_new[:, None], 0.0)  # z − m' ≤ 0
        p = tl.where(finite, tl.exp(d), 0.0)
        if ENTROPY:
            u = alpha * (u + (m - m_new) * s) + tl.sum(p * d, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    tl.store(max_ptr + rows, m, mask=live)
    tl.store(sum_ptr + rows, s, mask=live)
    tl.store(max_abs_ptr + rows, big, mask=live)
    if ENTROPY:
        tl.store(shifted_ptr + rows, u, mask=live)
    local = tl.load(tokens_ptr + rows, mask=live, other=-1) - start
    here = live & (local >= 0) & (local < width)
    z_y = tl.load(z_ptr + rows.to(tl.int64) * stride_z + local, mask=here, other=0.0)
    tl.store(z_y_ptr + rows, z_y.to(ACC), mask=here)


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
    lse_ptr,
    h_ptr,
    w_ptr,
    coef_ptr,
    stride_coef,
    n_bonus,
    prob_sum_ptr,
    entropy_ptr,
    max_other_ptr,
    bonus_sum_ptr,
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
    lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
    local = tl.load(tokens_ptr + rows, mask=live, other=-1) - start  # y_t within the chunk
    mass = tl.zeros([BLOCK_M], dtype=ACC)
    ent = tl.zeros([BLOCK_M], dtype=ACC)
    top = tl.zeros([BLOCK_M], dtype=ACC)
    if ENTROPY:
        h = tl.load(h_ptr + rows, mask=live, other=0.0)
        w = tl.load(w_ptr + rows, mask=live, other=0.0)
        bonus = tl.zeros([BLOCK_M], dtype=ACC)
    for c0 in range(0, width, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = live[:, None] & (cols[None, :] < width)
        sampled = cols[None, :] == local[:, None]
        logp = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=inside, other=0.0).to(ACC)
        logp = logp - lse[:, None]
        pi = tl.where(inside, tl.exp(logp), 0.0)
        operand = pi - tl.where(sampled, 1.0, 0.0)  # π − e_y
        tl.store(p_ptr + r64 * stride_p + cols[None, :], operand.to(p_ptr.dtype.element_ty),
                 mask=inside)  # fmt: skip
        mass += tl.sum(pi, axis=1)
        ent -= tl.sum(pi * logp, axis=1)
        top = tl.maximum(top, tl.max(tl.where(sampled, 0.0, pi), axis=1))
        if ENTROPY:
            e = w[:, None] * pi * (logp + h[:, None])  # 0 outside: π is
            tl.store(e_ptr + r64 * stride_e + cols[None, :], e.to(e_ptr.dtype.element_ty),
                     mask=inside)  # fmt: skip
            bonus += tl.sum(e, axis=1)
            for i in range(n_bonus):  # every loss that carries the bonus, from the same π, E
                c = tl.load(coef_ptr + i * stride_coef + rows, mask=live, other=0.0)
                g = tl.where(sampled, 0.0, tl.abs(e - c[:, None] * pi))  # |∂L_i/∂z_v|, v ≠ y
                at = i * stride_other + rows
                acc_mass = tl.load(other_mass_ptr + at, mask=live, other=0.0)
                tl.store(other_mass_ptr + at, acc_mass + tl.sum(g, axis=1), mask=live)
                acc_max = tl.load(other_max_ptr + at, mask=live, other=0.0)
                tl.store(other_max_ptr + at, tl.maximum(acc_max, tl.max(g, axis=1)), mask=live)
    acc_mass = tl.load(prob_sum_ptr + rows, mask=live, other=0.0)
    tl.store(prob_sum_ptr + rows, acc_mass + mass, mask=live)
    acc_ent = tl.load(entropy_ptr + rows, mask=live, other=0.0)
    tl.store(entropy_ptr + rows, acc_ent + ent, mask=live)
    acc_top = tl.load(max_other_ptr + rows, mask=live, other=0.0)
    tl.store(max_other_ptr + rows, tl.maximum(acc_top, top), mask=live)
    if ENTROPY:
        acc_bonus = tl.load(bonus_sum_ptr + rows, mask=live, other=0.0)
        tl.store(bonus_sum_ptr + rows, acc_bonus + bonus, mask=live)


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
        tl.store(col_sum_ptr + block * hidden + cols, tl.sum(r, axis=0), mask=cols < hidden)
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


def logsumexp_chunk(
    z: Tensor, tokens: Tensor, start: int, state: LogsumexpState, entropy: bool, blocks: Blocks
) -> None:
    """Fold one [M, Vc] logits chunk (columns start … start + Vc − 1) into ``state``."""
    require()
    m, width = z.shape
    if m == 0:
        return
    z = z.contiguous()
    bm, bv = _tile(blocks.token_rows, m), _tile(blocks.vocab_cols, width)
    _logsumexp_chunk[(_cdiv(m, bm),)](
        z, z.stride(0), tokens, start, width, m,
        state.max, state.sum, state.shifted, state.z_y, state.max_abs,
        ENTROPY=entropy, ACC=_acc(state.max.dtype), BLOCK_M=bm, BLOCK_V=bv,
        num_warps=blocks.num_warps,
    )  # fmt: skip


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
    lse: Tensor,
    operand: Tensor,
    stats: ProbStats,
    blocks: Blocks,
    bonus: Bonus | None = None,
) -> None:
    """Write P = π − e_y into ``operand`` [M, Vc] and fold the chunk into ``stats``; with
    ``bonus``, also write E and fold its sums."""
    require()
    m, width = z.shape
    if m == 0:
        return
    z = z.contiguous()
    if bonus is None:  # placeholders: the kernel compiled without the bonus never reads them
        e, h, w, coef, n_bonus = operand, lse, lse, stats.other_mass, 0
    else:
        e, h, w = bonus.out, bonus.entropy, bonus.weight
        coef, n_bonus = bonus.coefficients, bonus.losses
    bm, bv = _tile(blocks.token_rows, m), _tile(blocks.vocab_cols, width)
    _probs_chunk[(_cdiv(m, bm),)](
        z, z.stride(0), operand, operand.stride(0), e, e.stride(0), tokens, start, width, m,
        lse, h, w, coef, coef.stride(0), n_bonus,
        stats.prob_sum, stats.entropy, stats.max_other, stats.bonus_sum,
        stats.other_mass, stats.other_max, stats.other_mass.stride(0),
        ENTROPY=bonus is not None, ACC=_acc(lse.dtype), BLOCK_M=bm, BLOCK_V=bv,
        num_warps=blocks.num_warps,
    )  # fmt: skip


def row_stats(
    dense: Tensor,
    norms: Tensor,
    row_sum: Tensor,
    blocks: Blocks,
    delta: Tensor | None = None,
    bonus: Tensor | None = None,
) -> None:
    """r = −dense (− delta) (+ bonus), [Vc, H] each: ``norms`` [Vc] ← ‖r_v‖, ``row_sum`` [H]
    += Σ_v r_v. ``dense`` may be a column slice of a wider GEMM result (unit column stride)."""
    require()
    width, hidden = dense.shape
    if width == 0:
        return
    bv, bh = _tile(blocks.vocab_rows, width), _tile(blocks.hidden_cols, hidden)
    n_blocks = _cdiv(width, bv)
    partial = torch.empty(n_blocks, hidden, dtype=norms.dtype, device=norms.device)
    d2, b2 = delta, bonus  # placeholders below when absent: the kernel never reads them
    _row_stats[(n_blocks,)](
        dense, dense.stride(0),
        dense if d2 is None else d2, dense.stride(0) if d2 is None else d2.stride(0),
        dense if b2 is None else b2, dense.stride(0) if b2 is None else b2.stride(0),
        norms, partial, width, hidden,
        DELTA=d2 is not None, BONUS=b2 is not None, ACC=_acc(norms.dtype),
        BLOCK_V=bv, BLOCK_H=bh, num_warps=blocks.num_warps,
    )  # fmt: skip
    row_sum += partial.sum(0)
