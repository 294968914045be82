"""The fused lm_head engine: the streamed engine's two passes with Triton kernels between GEMMs.

Same inputs, same algorithm and the same `EngineResult` as `gradlens.engine.streamed.lm_head_pass`
(read its docstring for the maths: two passes over vocabulary chunks, resident chunks, dense
products shared between losses, the entropy bonus block). The GEMMs stay in torch (cuBLAS on a
GPU) and run exactly as there; what changes is the work around them, which the streamed engine
does as chains of element-wise torch operations, each a full read and write of an [M, Vc] or a
[Vc, k·H] block (performance.md: about half the time of a plain-torch sketch on an H100). Three
kernels (`gradlens.engine.fused_kernels`) each read their block once:

1. pass 1, after each logits GEMM z = h W_cᵀ: the chunk's softmax normaliser (m = max z,
   S = Σ e^{z − m} and, for the entropy H = log S − T/S, T = Σ e^{z − m}(z − m)) with its sums
   in float64 by blocks of 8, which torch adds by halving: the same order of additions as the
   streamed engine's `gradlens.summation`, so the chunks merge pairwise as there
   (`gradlens.logits.merge`); max_v |z_v| and z_y. The logits stay in the operand dtype (a bf16
   GEMM's output is upcast in registers, the same values the streamed engine upcasts in
   memory), so resident chunks cost half as much in bf16 as there.
2. pass 2, per chunk: π = exp((z − m) − log S) from the global normaliser and the GEMM operand
   P = π − e_y in the dense dtype, which folds the sampled-row correction into the GEMM:
   Pᵀ[c_1⊙h | … | c_k⊙h] is minus every loss's ∂L/∂W rows, sparse part included
   (Σ_t c_t(e_{y_t} − π_t)_v h_t). Per token −Σ π log π, max_{v≠y} π and the float64 block
   sums of π for Σ π; with the entropy bonus E = w·π·(log π + H), its block sums for Σ E and,
   for all the losses carrying the bonus at once, Σ_{v≠y}|E − c_i π| and max_{v≠y}|E − c_i π|.
3. pass 2, per loss, after the dense GEMM (and a shared product's correction GEMM, and the
   bonus's Eᵀh): the row block r = −D (− Δ) (+ B) read once for ‖r_v‖ and the float64 sums
   of each 8 rows, added by halving into Σ_v r_v.

GEMM-equivalents are counted as in the streamed engine (1 + (1 − f) + k, + 1 with the bonus,
less for shared products).

Rounding. Everything but the GEMM operands is computed in the softmax dtype, as in the streamed
engine; the sums the zero-sum check reads (S, Σ π, Σ E, Σ_v r_v) are float64 sums through the
same number of additions as there (blocks of 8 in any order, then halving), so both engines
meet the same bound (`gradlens.diagnostics.tolerances`); only the order inside a block of 8 and
of the other sums differs. With bf16 operands P is rounded to bf16 once, like
π there; at the sampled entry it is π_y − 1, formed in float32 before the rounding, so a
token's term c(1 − π_y)h of its sampled row keeps a relative error of a few u_bf16 = 2⁻⁸ even
when π_y → 1, where the streamed engine's c·h − c·bf16(π_y)·h cancels.

Devices and selection. On CUDA the kernels are compiled by Triton. On any other device they run
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported;
numpy, slow: for checking the kernels' logic, as the tests do), and otherwise the run is
refused. Triton is optional
(``pip install 'gradlens[gpu]'``; CUDA builds of torch ship it); without it this module imports
and `fused_lm_head_pass` raises a `GradlensError`. The fused path is opt-in: it is an engine
path of its own (``fused``), never chosen for ``--engine streamed`` and never chosen
automatically, because no GPU run has yet shown it faster than the streamed engine and equal
within tolerance (``benchmarks/bench_lmhead.py --methods gemm,naive,engine,fused`` measures both
in one run). ``AUTO_ON_CUDA`` records that verdict; set it only with such a measurement.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.engine import fused_kernels as kernels
from gradlens.engine.fused_kernels import Blocks, Bonus, ProbStats
from gradlens.engine.streamed import (
    CoefficientFn,
    EnginePlan,
    EngineResult,
    EntropyWeight,
    RowStats,
    TokenStats,
    bonus_weight,
    coefficients_at,
    dense_dtype,
    gemm_scales,
    sampled_logp,
    share_sources,
)
from gradlens.errors import GradlensError
from gradlens.logits import Normaliser, merge, softmax_dtype
from gradlens.summation import Cascade, PairwiseSum, halving_sum

AUTO_ON_CUDA = False  # no GPU measurement yet: the fused path is chosen only when asked for
TOKEN_BLOCK = 4096  # tokens per block when forming c⊙h (a [4096, H] float32 temporary)


def check_device(device: torch.device) -> None:
    """Raise a `GradlensError` unless the fused engine can run on ``device``."""
    kernels.require()
    if device.type != "cuda" and not kernels.INTERPRETING:
        raise GradlensError(
            f"engine 'fused': its Triton kernels run on CUDA, not on device '{device.type}'; "
            "use engine 'streamed' there (or set TRITON_INTERPRET=1 to run the kernels under "
            "Triton's interpreter, slowly, to check them)"
        )


def fused_lm_head_pass(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    coefficients_of: CoefficientFn,
    plan: EnginePlan,
    entropy_weight: EntropyWeight | None = None,
    entropy_losses: int | None = None,
    blocks: Blocks | None = None,
    token_entropy: bool = False,
) -> EngineResult:
    """`lm_head_pass` with fused element-wise work: the same arguments and result.

    ``hidden`` [M, H], ``weight`` [V, H], ``tokens`` [M]; ``coefficients_of(logp [M])`` →
    [c_1, …, c_k] ([M] each); ``entropy_weight`` [M] w_t = a_t·c_H of the entropy bonus (or a
    function of pass 1's H_t that gives it), added to the first ``entropy_losses`` losses (all
    when None); ``token_entropy``: the losses read H_t, ``coefficients_of(logp, entropy)``;
    ``blocks``: kernel tile sizes.
    """
    check_device(hidden.device)
    blocks = blocks or Blocks()
    m, v, width_h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    acc = softmax_dtype(weight.dtype)
    gemm_dtype = dense_dtype(hidden.dtype)
    device = hidden.device
    chunks = plan.chunks(v)
    tokens = tokens.contiguous()
    need_h = entropy_weight is not None or token_entropy
    gemms = 0.0

    # Pass 1: each chunk's normaliser (the kernel's float64 block sums added by halving), the
    # chunks merged pairwise as in the streamed engine; z_y and max|z| (and the tilt for H with
    # the bonus or ``token_entropy``); resident chunks kept.
    cascade: Cascade[Normaliser] = Cascade(merge)
    z_y = torch.zeros(m, dtype=acc, device=device)
    max_abs = torch.zeros(m, dtype=acc, device=device)
    kept: list[Tensor] = []
    for i, (start, end) in enumerate(chunks):
        z = hidden @ weight[start:end].T  # [M, Vc] in the operand dtype
        gemms += (end - start) / v
        part = kernels.normaliser_chunk(z, tokens, start, z_y, max_abs, need_h, blocks)
        tilt = None if part.tilt_blocks is None else halving_sum(part.tilt_blocks)
        cascade.add(Normaliser(part.max, halving_sum(part.sum_blocks), tilt))
        if i < plan.resident:
            kept.append(z)
    norm = cascade.result()
    if norm is None:
        raise GradlensError("engine 'fused': the lm_head has no rows")
    top, log_sum = norm.max.contiguous(), norm.log_sum().contiguous()
    logp = sampled_logp(z_y, norm)
    h1 = norm.entropy().to(acc).contiguous() if need_h else None

    coefficients = [
        c.contiguous() for c in coefficients_at(coefficients_of, logp, h1, token_entropy, acc)
    ]
    weight_h = bonus_weight(entropy_weight, h1)
    ent_w = None if weight_h is None else weight_h.to(acc).contiguous()
    k = len(coefficients)
    sources = share_sources(coefficients)
    direct = [i for i in range(k) if sources[i] is None]
    column = {idx: n for n, idx in enumerate(direct)}  # a direct loss's block of the dense product
    h_gemm = hidden.to(gemm_dtype)  # no copy when the operands have the dense dtype already
    # [M, k'·H] c⊙h of the direct losses, formed in the softmax dtype and rounded once to the
    # dense dtype, a block of tokens at a time: no [M, H] copy of h in float32
    scaled = torch.empty(m, len(direct) * width_h, dtype=gemm_dtype, device=device)
    for n, i in enumerate(direct):
        for t0 in range(0, m, TOKEN_BLOCK):
            rows = slice(t0, t0 + TOKEN_BLOCK)
            product = coefficients[i][rows, None] * hidden[rows].to(acc)
            scaled[rows, n * width_h : (n + 1) * width_h] = product
    # a shared loss: its source j, the tokens where they differ, (c_i − c_j)⊙h there
    deltas: dict[int, tuple[int, Tensor, Tensor]] = {}
    for i, src in enumerate(sources):
        if src is not None:
            j, diff = src
            diff_scaled = (coefficients[i] - coefficients[j])[diff, None] * hidden[diff].to(acc)
            deltas[i] = (j, diff, diff_scaled.to(gemm_dtype))
    n_ent = 0 if ent_w is None else (k if entropy_losses is None else entropy_losses)
    # [n, M] the coefficients of the losses carrying the bonus (one placeholder row if none)
    bonus_coef = torch.stack(coefficients[:n_ent]) if n_ent else top[None]

    stats = ProbStats.empty(m, n_ent, acc, device)
    prob_sum, ent_sum = PairwiseSum((m,), device), PairwiseSum((m,), device)
    norms = [torch.empty(v, dtype=acc, device=device) for _ in range(k)]
    row_sums = [PairwiseSum((width_h,), device) for _ in range(k)]

    # Pass 2: P = π − e_y and the per-token reductions, the GEMMs, then each loss's row block.
    for i, (start, end) in enumerate(chunks):
        if i < len(kept):
            z, kept[i] = kept[i], torch.empty(0)
        else:
            z = hidden @ weight[start:end].T
            gemms += (end - start) / v
        width = end - start
        operand = torch.empty(m, width, dtype=gemm_dtype, device=device)  # [M, Vc] P
        bonus = None
        if ent_w is not None and h1 is not None:
            e = torch.empty(m, width, dtype=gemm_dtype, device=device)  # [M, Vc] E
            bonus = Bonus(e, h1, ent_w, bonus_coef, n_ent)
        mass, e_sums = kernels.probs_chunk(z, tokens, start, top, log_sum, operand, stats, blocks,
                                           bonus)  # fmt: skip
        prob_sum.add(halving_sum(mass))
        if e_sums is not None:
            ent_sum.add(halving_sum(e_sums))
        del z, mass, e_sums
        ent_block = None
        if bonus is not None:
            ent_block = bonus.out.T @ h_gemm  # [Vc, H], shared by every loss with the bonus
            gemms += width / v
            del bonus, e
        dense = operand.T @ scaled  # [Vc, k'·H]: −(∂L/∂W rows) of every direct loss
        gemms += width / v * len(direct)
        for idx in range(k):
            delta = None
            if idx in deltas:
                j, diff_idx, diff_scaled = deltas[idx]
                delta = operand[diff_idx].T @ diff_scaled  # [Vc, H]
                gemms += width / v * diff_idx.numel() / max(m, 1)
                n = column[j]
            else:
                n = column[idx]
            partial = kernels.row_stats(
                dense[:, n * width_h : (n + 1) * width_h],
                norms[idx][start:end],
                blocks,
                delta=delta,
                bonus=ent_block if idx < n_ent else None,
            )
            row_sums[idx].add(halving_sum(partial, dim=0))
        del operand, dense, ent_block

    ent_y = None if ent_w is None or h1 is None else ent_w * logp.exp() * (logp + h1)
    gemm_scale = gemm_scales(coefficients, sources)
    return EngineResult(
        tokens=TokenStats(
            norm.lse(),
            logp,
            prob_sum.total(),
            stats.entropy,
            stats.max_other,
            max_abs,
            ent_y,
            None if ent_w is None else ent_sum.total(),
        ),
        coefficients=coefficients,
        rows=[
            RowStats(
                norms[i],
                row_sums[i].total(),
                stats.other_mass[i] if i < n_ent else None,
                stats.other_max[i] if i < n_ent else None,
                gemm_scale[i],
            )
            for i in range(k)
        ],
        gemm_equivalents=gemms,
    )
