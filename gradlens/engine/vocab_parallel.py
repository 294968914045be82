"""The vocab-parallel (tensor-parallel) lm_head engine: `lm_head_pass` with W's rows on P ranks.

Rank r holds W_r = W[v0_r : v1_r] [V_r, H] (`gradlens.engine.vocab_split`) and the full hidden
states h [M, H] and sampled ids y [M] of the same M tokens as every other rank. It runs the
single-process engine's two passes on its own rows (`first_pass`, `second_pass` of
`gradlens.engine.streamed`) and joins them with collectives over the group; the result is the
`EngineResult` that `lm_head_pass` returns on the whole W, on every rank.

Pass 1, per token t, on the rows of rank r (z = W_r h_t, π^r = softmax over those rows):

    λ_r = logsumexp_{v∈r} z_v                     the shard's logsumexp
    ζ_r = z_y if v0_r ≤ y < v1_r, else 0          the sampled logit, on its owner only
    α_r = max_{v∈r} |z_v|
    μ_r = max_{v∈r, v≠y} z_v  (−inf if none)      for max_{v≠y} π
    η_r = Σ_{v∈r} π^r_v (λ_r − z_v)  ≥ 0          the shard's entropy (entropy bonus, or
                                                  losses that read H_t: ``token_entropy``)

and these combine exactly into the global per-token statistics:

    lse = logsumexp_r λ_r             log π(y) = ζ_{owner(y)} − lse
    max_v |z_v| = max_r α_r           max_{v≠y} π_v = exp(max_r μ_r − lse)
    H = Σ_r e^{λ_r − lse}·(η_r + lse − λ_r)        (every term ≥ 0: no cancellation)

since Σ_{v∈r} π_v (lse − z_v) = e^{λ_r − lse}·Σ_{v∈r} π^r_v ((lse − λ_r) + (λ_r − z_v)). Two ways to
combine them (`PASS1`), both exact:

    all_gather   one collective: every rank gathers the [P, M, 4 or 5] statistics and combines
                 them locally, in rank order, so the result is bitwise the same on every rank
    max_sum      Megatron's and Cut Cross-Entropy's: all_reduce(MAX) of (λ_r, α_r, μ_r) gives
                 Λ = max_r λ_r; then one all_reduce(SUM) of (e^{λ_r − Λ}, ζ_r,
                 e^{λ_r − Λ}·(η_r + Λ − λ_r)) gives S, ζ and the entropy sum, and
                 lse = Λ + log S, H = Σ/S + log S. Two rounds, but O(M) bytes whatever P

Then ``coefficients_of(log π(y))`` (with ``token_entropy``: ``coefficients_of(log π(y), H)``, the
global H of the combination above) runs on every rank with the same input, so c_t is the same
on every rank (an all_gather makes it bitwise so). Pass 2 is local: π = exp(z − lse) on the
shard's rows, the dense GEMM, the sparse rows of the tokens the shard owns, the per-row norms
and partial sums. The finishing collectives:

    all_reduce(SUM) of one packed vector: the row norms of every loss, each rank's [V_r] written
        into zeros of [V] (adding zeros is exact, so this is the all-gather of the [V] norms),
        the row sums Σ_v ∂L/∂W_v [k, H], per token Σ_v π_v and −Σ_v π_v log π_v as summed from
        pass 2's entries, with the bonus Σ_v E_v and each bonus loss's Σ_{v≠y} |∂L/∂z_v|, and
        the GEMM count (summed over ranks, in units of 2·M·H·V);
    all_reduce(MAX) of each bonus loss's max_{v≠y} |∂L/∂z_v| (with the entropy bonus only: it
        depends on c_t, so pass 1 cannot give it).

With an `AttributionPlan` (`gradlens.engine.attribution`) every sum it accumulates is a sum over
vocabulary rows, so each rank's part over its own rows joins the same all_reduce(SUM): per
attributed loss u [M], e [M] and ‖G_i‖² [N], and the three shared per-token sums [3, M]. Pass 1
then also combines H_t (d = π(log π + H) needs it), as with the entropy bonus.

Collectives per run: all_gather: 1 + 1 (+ 1 with the entropy bonus); max_sum: 2 + 1 (+ 1).
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
    second_pass,
)
from gradlens.engine.vocab_split import VocabSplit
from gradlens.errors import GradlensError
from gradlens.logits import softmax_dtype
from gradlens.losses.registry import unknown_name_message


@dataclass(frozen=True)
class TokenTotals:
    """Pass 1's per-token statistics over the whole vocabulary, [M] each."""

    lse: Tensor
    z_y: Tensor
    max_abs: Tensor
    max_other_logit: Tensor
    entropy: Tensor | None  # H_t, with the entropy bonus or ``token_entropy`` only


def _columns(first: FirstPass) -> list[Tensor]:
    assert first.max_other_logit is not None
    cols = [first.lse, first.z_y, first.max_abs, first.max_other_logit]
    return cols if first.entropy is None else [*cols, first.entropy]


def combine_all_gather(first: FirstPass, owner: Tensor, comm: Collectives) -> TokenTotals:
    """One all_gather of [M, 4 or 5] per rank, combined locally in rank order."""
    g = comm.all_gather(torch.stack(_columns(first), dim=-1), "pass1")  # [P, M, 4|5]
    lam = g[..., 0]  # [P, M] λ_r
    lse = torch.logsumexp(lam, dim=0)  # [M]
    z_y = g[owner, torch.arange(owner.numel(), device=owner.device), 1]  # the owner's ζ
    entropy = None
    if first.entropy is not None:
        entropy = (torch.exp(lam - lse) * (g[..., 4] + (lse - lam))).sum(0)
    return TokenTotals(lse, z_y, g[..., 2].amax(0), g[..., 3].amax(0), entropy)


def combine_max_sum(first: FirstPass, owner: Tensor, comm: Collectives) -> TokenTotals:
    """all_reduce(MAX) of (λ_r, α_r, μ_r), then all_reduce(SUM) of (e^{λ_r−Λ}, ζ_r, and with the
    bonus e^{λ_r−Λ}·(η_r + Λ − λ_r))."""
    assert first.max_other_logit is not None
    top = comm.all_reduce(
        torch.stack([first.lse, first.max_abs, first.max_other_logit], dim=-1), "max", "pass1.max"
    )  # [M, 3]
    big = top[:, 0]  # Λ = max_r λ_r
    scale = torch.exp(first.lse - big)  # e^{λ_r − Λ} ≤ 1
    cols = [scale, first.z_y]
    if first.entropy is not None:
        cols.append(scale * (first.entropy + (big - first.lse)))
    sums = comm.all_reduce(torch.stack(cols, dim=-1), "sum", "pass1.sum")  # [M, 2|3]
    log_s = torch.log(sums[:, 0])
    entropy = None if first.entropy is None else sums[:, 2] / sums[:, 0] + log_s
    return TokenTotals(big + log_s, sums[:, 1], top[:, 1], top[:, 2], entropy)


CombineFn = Callable[[FirstPass, Tensor, Collectives], TokenTotals]
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

    first = first_pass(
        hidden, weight_shard, local, plan, entropy=need_h, other_logit=True, vocab=split.vocab
    )
    totals = combine(first, split.owner(tokens), comm)
    logp = totals.z_y - totals.lse
    coefficients = coefficients_at(coefficients_of, logp, totals.entropy, token_entropy, acc)
    ent_w = bonus_weight(entropy_weight, totals.entropy)
    second = second_pass(
        hidden,
        weight_shard,
        local,
        totals.lse,
        coefficients,
        plan,
        first.kept,
        totals.entropy,
        ent_w,
        entropy_losses,
        vocab=split.vocab,
        gemms=first.gemms,
        attribution=attribution,
    )
    whole = _finish(second, split, v0, v1, comm)
    return assemble(
        totals.lse,
        logp,
        totals.max_abs,
        torch.exp(totals.max_other_logit - totals.lse),
        totals.entropy,
        coefficients,
        whole,
        ent_w,
        whole.gemms,
    )


def _finish(
    second: SecondPass, split: VocabSplit, v0: int, v1: int, comm: Collectives
) -> SecondPass:
    """Pass 2's partial results of every rank, reduced: one all_reduce(SUM), and with the
    entropy bonus one all_reduce(MAX)."""
    k, m = len(second.norms), second.prob_sum.numel()
    h = second.row_sums[0].numel() if k else 0
    n_ent = len(second.other_mass)
    bonus = second.entropy_grad_sum is not None
    ref = second.prob_sum
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
        *second.row_sums,
        second.prob_sum,
        second.entropy,
        *([second.entropy_grad_sum] if second.entropy_grad_sum is not None else []),
        *second.other_mass,
        *attr_parts,
        torch.tensor([second.gemms], dtype=ref.dtype, device=ref.device),
    ]
    total = comm.all_reduce(torch.cat(parts), "sum", "finish.sum")
    attr_size = sum(p.numel() for p in attr_parts)
    sizes = [k * split.vocab, k * h, m, m, m * bonus, m * n_ent, attr_size, 1]
    pieces = list(torch.split(total, sizes))
    norms_all, row_sums, prob_sum, entropy, ent_sum, other_mass, attr_all, gemms = pieces
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
        attribution=summed,
    )
