"""The vocab-parallel (tensor-parallel) lm_head engine: `lm_head_pass` with W's rows on P ranks.

Rank r holds W_r = W[v0_r : v1_r] [V_r, H] (`gradlens.engine.vocab_split`) and the full hidden
states h [M, H] and sampled ids y [M] of the same M tokens as every other rank. It runs the
single-process engine's two passes on its own rows (`first_pass`, `second_pass` of
`gradlens.engine.streamed`) and joins them with collectives over the group; the result is the
`EngineResult` that `lm_head_pass` returns on the whole W, on every rank.

Pass 1, per token t, on the rows of rank r (z = W_r h_t; `gradlens.logits` for the normaliser):

    m_r = max_{v∈r} z_v,  S_r = Σ_{v∈r} e^{z_v − m_r}  the shard's normaliser (S_r a float64 sum)
    T_r = Σ_{v∈r} e^{z_v − m_r}(z_v − m_r)          its tilt (entropy bonus only; float64)
    ζ_r = z_y if v0_r ≤ y < v1_r, else 0            the sampled logit, on its owner only
    α_r = max_{v∈r} |z_v|
    μ_r = max_{v∈r, v≠y} z_v  (−inf if none)        for max_{v≠y} π

T_r is accumulated with the entropy bonus, with losses that read H_t (``token_entropy``) and
with the attribution.

and these combine exactly into the global per-token statistics, with d_r = m_r − m ≤ 0:

    m = max_r m_r,  S = Σ_r e^{d_r} S_r,  T = Σ_r e^{d_r} (T_r + d_r S_r)
    log π(y) = (ζ_{owner(y)} − m) − log S           H = log S − T/S
    max_v |z_v| = max_r α_r                         max_{v≠y} π_v = exp((max_r μ_r − m) − log S)

— the single-process engine's merge of two chunks (`gradlens.logits.merge`), over P parts at
once. The sums over the ranks are taken so that they add one rounding, not one per rank
(`gradlens.summation`), and the zero-sum bound holds for any P and split
(`gradlens.diagnostics.tolerances`). Two ways to combine them (`PASS1`):

    all_gather   one collective: every rank gathers the [P, M, ·] statistics (the float64 S_r,
                 T_r carried bit for bit beside the softmax-dtype columns) and combines them
                 locally, in rank order, by a compensated sum: the result is bitwise the same
                 on every rank
    max_sum      Megatron's and Cut Cross-Entropy's: all_reduce(MAX) of (m_r, α_r, μ_r) gives
                 m; then one all_reduce(SUM), in float64, of ζ_r and of e^{d_r} S_r and
                 e^{d_r}(T_r + d_r S_r) each split into two parts on a common grid
                 (`summation.grid_parts`, exact whatever order the backend adds them in). Two
                 rounds, but O(M) bytes whatever P

Then ``coefficients_of(log π(y))`` (with ``token_entropy``: ``coefficients_of(log π(y), H)``, the
global H of the combination above) runs on every rank with the same input, so c_t is the same
on every rank (an all_gather makes it bitwise so). Pass 2 is local: π = exp((z − m) − log S) on
the shard's rows, the dense GEMM, the sparse rows of the tokens the shard owns, the per-row
norms and partial sums. The finishing collectives:

    all_reduce(SUM) of one packed vector: the row norms of every loss, each rank's [V_r] written
        into zeros of [V] (adding zeros is exact, so this is the all-gather of the [V] norms),
        per token −Σ_v π_v log π_v as summed from pass 2's entries, with the bonus each bonus
        loss's Σ_{v≠y} |∂L/∂z_v|, and the GEMM count (summed over ranks, in units of 2·M·H·V);
    all_gather of the float64 sums the zero-sum check reads: the row sums Σ_v ∂L/∂W_v [k, H],
        per token Σ_v π_v and with the bonus Σ_v E_v, added locally in rank order by a
        compensated sum (one rounding whatever P; bitwise the same on every rank);
    all_reduce(MAX) of each bonus loss's max_{v≠y} |∂L/∂z_v| (with the entropy bonus only: it
        depends on c_t, so pass 1 cannot give it).

With an `AttributionPlan` (`gradlens.engine.attribution`) every sum it accumulates is a sum over
vocabulary rows, so each rank's part over its own rows joins the same all_reduce(SUM): per
attributed loss u [M], e [M] and ‖G_i‖² [N], and the three shared per-token sums [3, M]. Pass 1
then also combines H_t (d = π(log π + H) needs it), as with the entropy bonus.

A replayed sampling support (``kept_ids`` [M, K], global ids, the same on every rank;
``loss.sampling_support: kept``, `gradlens.grads.replay`): each rank restricts its own rows to
K_t as the single-process engine restricts each chunk (logits outside K_t → −inf as they are
formed), so its m_r, S_r, T_r and μ_r are those of K_t ∩ [v0_r, v1_r). A rank holding none of
a token's K_t has m_r = −inf and S_r = T_r = 0, and the combination gives it weight e^{d_r} = 0
(`gradlens.logits.rescale`, in both ways of combining). The same collective then gives
log π̃(y) = (z_y − m) − log S̃ with S̃ = Σ_{v∈K_t} e^{z_v − m}, the kept mass of π_θ being
S̃·e^{m − lse}, and pass 2, with the same restriction, gives c_t(e_y − π̃_t) on every rank's rows,
rows outside K_t exactly 0 (their π̃ is e^{−inf} = 0). No collective carries K_t: each rank reads
the ids that fall in its rows. max |z| is taken before the restriction, as in one process.

Collectives per run: all_gather: 1 + 2 (+ 1 with the entropy bonus); max_sum: 2 + 2 (+ 1).
The `Collectives` object counts their bytes (docs/scaling.md has the formulas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.engine.attribution import AttributionPlan, AttributionSums, LossSums, TokenSums
from gradlens.engine.collectives import Collectives
from gradlens.engine.streamed import (
    CoefficientFn,
    EnginePlan,
    EngineResult,
    EntropyWeight,
    FirstPass,
    SecondPass,
    assemble,
    bonus_weight,
    coefficients_at,
    first_pass,
    sampled_logp,
    second_pass,
)
from gradlens.engine.vocab_split import VocabSplit
from gradlens.errors import GradlensError
from gradlens.logits import Normaliser, merge_all, rescale, softmax_dtype
from gradlens.losses.registry import unknown_name_message
from gradlens.summation import WIDE, compensated_sum, grid_parts, join


@dataclass(frozen=True)
class TokenTotals:
    """Pass 1's per-token statistics over the whole vocabulary, [M] each."""

    norm: Normaliser  # the global m, S (and T when H_t is needed)
    z_y: Tensor
    max_abs: Tensor
    max_other_logit: Tensor


def _pack(narrow: list[Tensor], wide: list[Tensor]) -> Tensor:
    """[M, n] columns in the softmax dtype, the float64 ``wide`` ones carried bit for bit (two
    float32 columns each when the softmax dtype is float32: an all_gather only copies)."""
    cols = torch.stack(narrow, dim=-1)  # [M, a]
    bits = torch.stack(wide, dim=-1).view(cols.dtype)  # [M, b·8/size]
    return torch.cat([cols, bits], dim=-1)


def _unpack(g: Tensor, narrow: int) -> tuple[Tensor, Tensor]:
    """`_pack`'s inverse on gathered [P, M, n]: [P, M, a] and the float64 [P, M, b]."""
    return g[..., :narrow], g[..., narrow:].contiguous().view(WIDE)


def combine_all_gather(
    first: FirstPass, owner: Tensor, comm: Collectives, vocab: int
) -> TokenTotals:
    """One all_gather of every rank's statistics, combined locally in rank order."""
    assert first.max_other_logit is not None
    norm = first.norm
    narrow = [norm.max, first.z_y, first.max_abs, first.max_other_logit]
    wide = [norm.sum] if norm.tilt is None else [norm.sum, norm.tilt]
    g = comm.all_gather(_pack(narrow, wide), "pass1")  # [P, M, ·]
    cols, sums = _unpack(g, len(narrow))
    tilt = None if norm.tilt is None else sums[..., 1]
    total = merge_all(cols[..., 0], sums[..., 0], tilt)
    z_y = cols[owner, torch.arange(owner.numel(), device=owner.device), 1]  # the owner's ζ
    return TokenTotals(total, z_y, cols[..., 2].amax(0), cols[..., 3].amax(0))


def combine_max_sum(first: FirstPass, owner: Tensor, comm: Collectives, vocab: int) -> TokenTotals:
    """all_reduce(MAX) of (m_r, α_r, μ_r), then one float64 all_reduce(SUM) of ζ_r and of the
    rescaled S_r (and T_r) on a common grid, so that the backend's order does not round."""
    assert first.max_other_logit is not None
    norm = first.norm
    top = comm.all_reduce(
        torch.stack([norm.max, first.max_abs, first.max_other_logit], dim=-1), "max", "pass1.max"
    )  # [M, 3]
    m = top[:, 0]
    # [M] d_r = m_r − m ≤ 0 and e^{d_r}; 0 and 0 where this shard holds none of a replayed K_t
    # (m_r = −inf, S_r = T_r = 0), so that −inf·0 makes no NaN
    d, f = rescale(norm.max, m)
    # e^{d_r} S_r ≤ V_r and e^{d_r}|T_r + d_r S_r| = Σ_v e^{z_v − m}|z_v − m| ≤ V_r/e: within 2V
    cols = [*grid_parts(f * norm.sum, 2.0 * vocab, comm.world), first.z_y.to(WIDE)]
    if norm.tilt is not None:
        cols += grid_parts(f * (norm.tilt + d * norm.sum), 2.0 * vocab, comm.world)
    sums = comm.all_reduce(torch.stack(cols, dim=-1), "sum", "pass1.sum")  # [M, 3|5]
    tilt = None if norm.tilt is None else join(sums[:, 3], sums[:, 4])
    total = Normaliser(m, join(sums[:, 0], sums[:, 1]), tilt)
    return TokenTotals(total, sums[:, 2].to(m.dtype), top[:, 1], top[:, 2])


CombineFn = Callable[[FirstPass, Tensor, Collectives, int], TokenTotals]
PASS1: dict[str, CombineFn] = {"all_gather": combine_all_gather, "max_sum": combine_max_sum}


def vocab_parallel_pass(
    hidden: Tensor,
    weight_shard: Tensor,
    tokens: Tensor,
    coefficients_of: CoefficientFn,
    plan: EnginePlan,
    split: VocabSplit,
    comm: Collectives | None = None,
    entropy_weight: EntropyWeight | None = None,
    entropy_losses: int | None = None,
    pass1: str = "all_gather",
    token_entropy: bool = False,
    attribution: AttributionPlan | None = None,
    kept_ids: Tensor | None = None,
) -> EngineResult:
    """`lm_head_pass` on this rank's rows of W; the same `EngineResult` on every rank.

    Args:
        hidden: [M, H] the hidden states of the valid tokens (the same on every rank).
        weight_shard: [V_r, H] rows ``split.shard(rank)`` of the lm_head weight.
        tokens: [M] sampled ids y in [0, V) (global ids, the same on every rank).
        coefficients_of: ``logp [M] -> [c_1, …, c_k]``, run on every rank with the same
            input; it must return the same coefficients on every rank (any reduction over a
            data-parallel group happens inside it).
        plan: the chunking of this rank's V_r rows (`gradlens.engine.streamed.plan` with
            ``vocab=V_r``).
        split: the rows of every rank.
        comm: the tensor-parallel group's collectives (default group when None); its ``log``
            records what was sent.
        entropy_weight, entropy_losses, token_entropy: as for `lm_head_pass` (H_t is the
            global one, combined by pass 1's collective: the same on every rank).
        pass1: how pass 1's statistics are combined, a key of `PASS1`.
        attribution: as for `lm_head_pass`; its sums are those of the whole W on every rank.
        kept_ids: [M, K] the replayed kept sets K_t (global ids, −1 padding; the same on every
            rank), or None: the whole vocabulary. Each rank restricts its own rows to them.

    Returns:
        The `EngineResult` of the whole W: per-token statistics [M], coefficients, for every
        loss the [V] row norms and the [H] row sum, and the GEMM-equivalents of all ranks
        together (in units of 2·M·H·V).
    """
    comm = Collectives() if comm is None else comm
    try:
        combine = PASS1[pass1]
    except KeyError:
        raise GradlensError(unknown_name_message("pass-1 collective", pass1, list(PASS1))) from None
    rank = comm.rank
    if split.world != comm.world:
        raise GradlensError(
            f"tensor_parallel: the vocabulary split has {split.world} ranks, the group {comm.world}"
        )
    v0, v1 = split.shard(rank)
    if weight_shard.shape[0] != v1 - v0:
        raise GradlensError(
            f"tensor_parallel: rank {rank} holds rows [{v0}, {v1}) ({v1 - v0} rows) but its "
            f"weight shard has {weight_shard.shape[0]}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= split.vocab):
        raise GradlensError(f"tensor_parallel: token ids must lie in [0, {split.vocab})")
    acc = softmax_dtype(weight_shard.dtype)
    need_h = entropy_weight is not None or token_entropy or attribution is not None
    local = tokens - v0  # ids of this shard's rows; the others fall outside [0, V_r)
    # K_t in this shard's row ids: another shard's ids and the padding fall outside [0, V_r)
    kept_local = None if kept_ids is None else torch.where(kept_ids >= 0, kept_ids - v0, -1)

    first = first_pass(
        hidden,
        weight_shard,
        local,
        plan,
        entropy=need_h,
        other_logit=True,
        vocab=split.vocab,
        kept_ids=kept_local,
    )
    totals = combine(first, split.owner(tokens), comm, split.vocab)
    logp = sampled_logp(totals.z_y, totals.norm)
    entropy = None if totals.norm.tilt is None else totals.norm.entropy().to(acc)
    coefficients = coefficients_at(coefficients_of, logp, entropy, token_entropy, acc)
    ent_w = bonus_weight(entropy_weight, entropy)
    second = second_pass(
        hidden,
        weight_shard,
        local,
        totals.norm,
        coefficients,
        plan,
        first.kept,
        entropy,
        ent_w,
        entropy_losses,
        vocab=split.vocab,
        gemms=first.gemms,
        kept_ids=kept_local,
        attribution=attribution,
    )
    whole = _finish(second, split, v0, v1, comm)
    return assemble(
        totals.norm.lse(),
        logp,
        totals.max_abs,
        sampled_logp(totals.max_other_logit, totals.norm).exp(),  # as pass 2 forms π
        entropy,
        coefficients,
        whole,
        ent_w,
        whole.gemms,
    )


def _finish(
    second: SecondPass, split: VocabSplit, v0: int, v1: int, comm: Collectives
) -> SecondPass:
    """Pass 2's partial results of every rank, reduced: one all_reduce(SUM), one all_gather of
    the float64 zero-sum sums (added in rank order), and with the entropy bonus one
    all_reduce(MAX)."""
    k, m = len(second.norms), second.prob_sum.numel()
    h = second.row_sums[0].numel() if k else 0
    n_ent = len(second.other_mass)
    bonus = second.entropy_grad_sum is not None
    ref = second.entropy
    attr = second.attribution
    attr_parts: list[Tensor] = []
    if attr is not None:
        t = attr.tokens
        attr_parts = [t.other_sq, t.other_pd, t.dd]
        for s in attr.losses:
            attr_parts += [s.u, s.e, s.sequence_sq]
    norms = torch.zeros(k, split.vocab, dtype=ref.dtype, device=ref.device)  # [k, V]
    for i, n in enumerate(second.norms):
        norms[i, v0:v1] = n
    parts = [
        norms.reshape(-1),
        second.entropy,
        *second.other_mass,
        *attr_parts,
        torch.tensor([second.gemms], dtype=ref.dtype, device=ref.device),
    ]
    total = comm.all_reduce(torch.cat(parts), "sum", "finish.sum")
    attr_size = sum(p.numel() for p in attr_parts)
    sizes = [k * split.vocab, m, m * n_ent, attr_size, 1]
    norms_all, entropy, other_mass, attr_all, gemms = torch.split(total, sizes)
    sums = [*second.row_sums, second.prob_sum]
    if second.entropy_grad_sum is not None:
        sums.append(second.entropy_grad_sum)
    wide = compensated_sum(comm.all_gather(torch.cat(sums), "finish.gather"))  # rank order
    row_sums, prob_sum, ent_sum = torch.split(wide, [k * h, m, m * bonus])
    summed = None
    if attr is not None:
        values = list(torch.split(attr_all, [p.numel() for p in attr_parts]))
        losses = [LossSums(*values[3 + 3 * i : 6 + 3 * i]) for i in range(len(attr.losses))]
        summed = AttributionSums(TokenSums(*values[:3]), losses, attr.entropy)
    other_max = second.other_max
    if n_ent:
        top = comm.all_reduce(torch.stack(other_max), "max", "finish.max")  # [n_ent, M]
        other_max = list(top.unbind(0))
    return SecondPass(
        norms=list(norms_all.reshape(k, split.vocab).unbind(0)),
        row_sums=list(row_sums.reshape(k, h).unbind(0)),
        prob_sum=prob_sum,
        entropy=entropy,
        max_other=torch.empty(0),  # from pass 1 instead (its max over all ranks)
        entropy_grad_sum=ent_sum if bonus else None,
        other_mass=list(other_mass.reshape(n_ent, m).unbind(0)),
        other_max=other_max,
        gemms=float(gemms),
        gemm_scale=second.gemm_scale,  # from the coefficients, the same on every rank
        attribution=summed,
    )
