"""The sampled agreement check of the streamed engines: autograd on a sample, never [M, V].

The full reference (`gradlens.grads.autograd_reference`) differentiates the objective through
log_softmax(W h) over every token and every vocabulary row — [M, V] under autograd per loss,
which is what the streamed engine exists to avoid. The sampled check differentiates the same
objective (`gradlens.grads.objective`) by torch.autograd, exactly, but only with respect to

- ℓ_t = log π(y_t) of every valid token: c_t = ∂L/∂ℓ_t, compared in full;
- the logits of a sample S of tokens (`SAMPLED_TOKENS` evenly spaced over the valid tokens, and
  the token of largest |c_t|): ∂L/∂z_t by autograd over the whole row, compared at the sampled
  entry with the engine's ∂L/∂z_{t,y_t};
- a sample R of lm_head rows (the `TOP_ROWS` rows of largest ‖∂L/∂W_v‖ in the engine's result,
  the sampled tokens' rows of S, and `SPREAD_ROWS` rows evenly spaced over the vocabulary):
  ∂L/∂W_v for v ∈ R, whose norms are compared with the engine's ‖∂L/∂W_v‖.

How the rows R stay exact without [M, V] under autograd: the log-normaliser of token t splits
into the rows of R and the rest,

    lse_t = log(Σ_{v ∈ R} e^{z_tv} + e^{ρ_t}),    ρ_t = logsumexp_{v ∉ R} z_tv,

and ρ_t does not depend on W_R, so it is computed once without autograd, `block` tokens at a
time ([block, V] at most). Then ℓ_t = z_{t,y_t} − lse_t, with z_{t,y_t} a function of W_R when
y_t ∈ R and a constant otherwise, and autograd through it gives ∂L/∂W_R exactly as through the
full softmax. The entropy bonus alike: H_t = lse_t − Σ_{v ∈ R} π_tv·z_tv − e^{ρ_t − lse_t}·μ_t,
with μ_t = Σ_{v ∉ R} e^{z_tv − ρ_t}·z_tv another constant of that pass.

The distillation term (``loss.distill``, D_t = Σ_{v∈S_t} φ(l_v, lq_v), l_v = z_tv − lse_t;
`gradlens.losses.distill`) alike: its entries on R are differentiated through z_tR and lse_t;
those outside R depend on W_R only through lse_t, with ∂/∂lse_t = −Σ_{v∈S_t∖R} ψ_v, so

    D_t = Σ_{v∈S_t∩R} φ(l_v, lq_v) + Φ_t − (lse_t − sg(lse_t))·Ψ_t,

Φ_t = Σ_{v∈S_t∖R} φ_v and Ψ_t = Σ_{v∈S_t∖R} ψ_v constants of the same pass (which also finds
the teacher's log-probs lq on R): the value is D_t and the gradient exact. The sampled tokens'
rows differentiate D_t over the whole row.

Cost: that pass (one GEMM of M×V×H, shared by every loss; with a teacher pair one more; it
keeps the sampled tokens' [|S|, V] logit rows), then per loss [M, |R|] and [|S|, V] under
autograd. The samples are fixed by the batch (no random
draw), so a run repeats.

Under tensor parallelism (`choose_sample_parallel`; rank r holds W's rows [v0_r, v1_r)) the
sample is chosen as in one process (the engine's row norms and coefficients are the same on
every rank), and the check is the same autograd on every rank. What it needs of W:

- the constant pass: each rank runs it over its own rows, per token the logsumexp of its rows,
  of its rows outside R and of its rows other than y_t, the π-weighted means of z there and z_y
  on the owner of y_t; one all_gather of these [M, 7] columns per rank combines them exactly as
  the single-process engine combines vocabulary chunks (logsumexp of the parts, each mean
  rescaled by e^{lse_r − lse});
- the rows W_R: one all_gather of each rank's rows of R ([max_r |R ∩ r|, H] per rank, padded),
  so every rank holds W_R bit for bit and differentiates through it as one process does;
- the sampled tokens' logit rows: not gathered. ∂L/∂z_{t,y_t} is differentiated through the same
  split as the rows, with R = {y_t}: lse_t = log(e^{z_{t,y_t}} + e^{ρ'_t}), ρ'_t the logsumexp
  over v ≠ y_t from the constant pass (and H_t through μ'_t likewise), which is exact.

Why this and not each rank differentiating its own rows: the objective couples every row of
every token through lse_t, so a per-rank autograd needs a differentiable collective inside the
graph, and z_{t,R} for all M tokens would be [M, |R|] numbers to move where W_R is [|R|, H]
(H < M in a training batch). Per rank sent: (P − 1)·7·M·b for the constant pass and
(P − 1)·max_r |R ∩ r|·H·b_op for W_R, against (P − 1)·|S|·V_r·b had the [|S|, V] logit rows
been gathered. The numbers it reports (relative errors of the engine against autograd) are
rounding residuals, which any change in the order of the sums changes: they match one process's
to within 1e-12 absolute, not digit for digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch, Teacher
from gradlens.diagnostics.agreement import row_scales
from gradlens.engine.collectives import Collectives
from gradlens.engine.vocab_split import VocabSplit
from gradlens.grads import objective, on_grid, reads_entropy
from gradlens.logits import compute_logits, floored_exp, softmax_dtype
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.losses.base import Distill
from gradlens.losses.distill import entry_terms, student_at, teacher_tokens, token_value

SAMPLED_TOKENS = 64  # tokens whose whole logit row is differentiated
TOP_ROWS = 32  # lm_head rows of largest gradient norm in the engine's result
SPREAD_ROWS = 32  # lm_head rows evenly spaced over the vocabulary
BLOCK_ENTRIES = 1 << 25  # tokens × vocabulary entries of one block of the constant pass


@dataclass(frozen=True)
class DistillSample:
    """The distillation term's constants of the pass (module docstring), [M] or [M, R] each.

    Attributes:
        d: the term's settings; teacher: the batch's teacher; grid_rows, grid_cols: [M] the
            valid tokens' places on the [N, T] grid (to read the teacher there).
        value: D_t; rest_value: Φ_t; rest_psi: Ψ_t.
        lq_rows: [M, R] the teacher's log q_t at the rows of R (0 where R is outside S_t);
        in_support: [M, R] whether each row of R is in S_t.
    """

    d: Distill
    teacher: Teacher
    grid_rows: Tensor
    grid_cols: Tensor
    value: Tensor
    rest_value: Tensor
    rest_psi: Tensor
    lq_rows: Tensor
    in_support: Tensor


@dataclass(frozen=True)
class Sample:
    """What is checked, and the constants of the rows outside R (shared by every loss).

    Attributes:
        tokens: [S] indices into the M valid tokens.
        rows: [R] lm_head rows, sorted.
        rest_lse: [M] ρ_t = logsumexp over the rows outside R.
        rest_mean: [M] μ_t = Σ_{v ∉ R} e^{z_tv − ρ_t}·z_tv (for the entropy bonus).
        logit_y: [M] z_{t,y_t} (a constant where y_t is not in R).
        logp: [M] ℓ_t of that pass (the other tokens' ℓ when S is differentiated).
        entropy: [M] H_t of that pass.
        distill: the distillation term's constants, when the run has one.
        row_weights: [R, H] W_R (gathered under tensor parallelism); None: read from the batch.
        other_lse: [M] ρ'_t = logsumexp over v ≠ y_t, and ``other_mean`` [M] μ'_t the mean of z
            there: the sampled tokens' ∂L/∂z_{t,y_t} through them (tensor parallelism), or None:
            through the whole row.
        token_logits: [S, V] the sampled tokens' logit rows, kept from the constant pass (None:
            computed again from W).
    """

    tokens: Tensor
    rows: Tensor
    rest_lse: Tensor
    rest_mean: Tensor
    logit_y: Tensor
    logp: Tensor
    entropy: Tensor
    distill: DistillSample | None = None
    row_weights: Tensor | None = None
    other_lse: Tensor | None = None
    other_mean: Tensor | None = None
    token_logits: Tensor | None = None


@dataclass(frozen=True)
class SampledReference:
    """One loss by autograd on the sample."""

    coefficient: Tensor  # [N, T] ∂L/∂ℓ_t
    grad_at_y: Tensor  # [S] ∂L/∂z_{t,y_t} of the sampled tokens
    row_norms: Tensor  # [R] ‖∂L/∂W_v‖ of the sampled rows
    non_finite: int  # NaN/inf entries among those gradients
    row_scales: Tensor  # [R] S_v = Σ_t |c_t|·(π_t,v + [v = y_t])·‖h_t‖: the size of row v's terms


def evenly(count: int, total: int) -> Tensor:
    """``count`` indices evenly spaced over range(total) (all of them when count ≥ total)."""
    if total <= count:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long().unique()


@dataclass(frozen=True)
class DistillInputs:
    """What the pass needs of the distillation term: its settings, the teacher and the valid
    tokens' places on the [N, T] grid."""

    d: Distill
    teacher: Teacher
    grid_rows: Tensor
    grid_cols: Tensor


def distill_block(
    inputs: DistillInputs, log_p: Tensor, span: slice, rows: Tensor, outside: Tensor
) -> tuple[Tensor, ...]:
    """(D_t, Φ_t, Ψ_t, lq on R, R in S_t) of one block of tokens from its log π [b, V]."""
    vocab = int(log_p.shape[-1])
    teacher = teacher_tokens(
        inputs.teacher,
        inputs.grid_rows[span],
        inputs.grid_cols[span],
        inputs.d,
        vocab,
        log_p.dtype,
    )
    lp, lq = student_at(log_p, teacher)  # [b, S]
    phi, psi = entry_terms(lp, lq, inputs.d)
    if teacher.ids is None:  # full: S_t is the vocabulary
        rest = outside.expand_as(lp)
        lq_rows, in_support = lq[:, rows], torch.ones_like(lq[:, rows], dtype=torch.bool)
    else:
        rest = outside[teacher.ids]  # [b, K]
        match = teacher.ids[:, :, None] == rows[None, None, :]  # [b, K, R]; ids are distinct
        in_support = match.any(1)
        lq_rows = torch.where(match, lq[:, :, None], 0.0).sum(1)
    zero = torch.zeros((), dtype=phi.dtype, device=phi.device)
    return (
        phi.sum(-1),
        torch.where(rest, phi, zero).sum(-1),
        torch.where(rest, psi, zero).sum(-1),
        lq_rows,
        in_support,
    )


def sample_of(tokens: Tensor, c_abs: Tensor, row_norms: Tensor) -> tuple[Tensor, Tensor]:
    """(S, R): the sampled tokens and rows (see the module docstring), from the engine's
    coefficients and [V] row norms (the same on every tensor-parallel rank)."""
    m, vocab = int(tokens.numel()), int(row_norms.numel())
    device = tokens.device
    picked = evenly(SAMPLED_TOKENS, m).to(device)
    if m:
        picked = torch.cat([picked, c_abs.argmax().reshape(1)]).unique()
    top = row_norms.double().nan_to_num(posinf=1e300).topk(min(TOP_ROWS, vocab)).indices
    rows = torch.cat([top.to(device), tokens[picked], evenly(SPREAD_ROWS, vocab).to(device)])
    return picked, rows.unique()  # rows sorted


def choose_sample(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    c_abs: Tensor,
    row_norms: Tensor,
    distill: DistillInputs | None = None,
) -> Sample:
    """The sample and the constant pass over all logits (see the module docstring).

    Per block of tokens, with d = z − max_v z ≤ 0 and e = exp d (`gradlens.logits.floored_exp`:
    below e^−87 in float32 an entry is taken at e^−87, which moves every sum by less than
    V·e^−87 relative to the maximum's own term 1): S' = Σ_{v ∉ R} e_v and U' = Σ_{v ∉ R} e_v·d_v
    over the rows outside R, the rows of R added from their own [b, |R|] columns, so

        lse = max + log S,  ℓ = d_y − log S,  H = log S − U/S,  ρ = max + log S',
        μ = max + U'/S'     (S = S' + Σ_R e, U = U' + Σ_R e·d).

    Six passes over each [b, V] block besides its GEMM (max, − max, floor, exp, Σ e, Σ e·d).
    ρ and μ enter the reference only as e^{ρ − lse} = S'/S and e^{ρ − lse}·μ = (max·S' + U')/S,
    so the floor moves them by at most V·e^−87 and 2·V·e^−87·max|z|. The sampled tokens' logit
    rows are kept for `sampled_reference` (``token_logits``)."""
    m, vocab = int(tokens.numel()), int(weight.shape[0])
    device = weight.device
    picked, rows = sample_of(tokens, c_abs, row_norms)
    outside = torch.ones(vocab, dtype=torch.bool, device=device)
    outside[rows] = False
    acc = softmax_dtype(weight.dtype)
    rest_lse, rest_mean, logit_y, logp, entropy = [], [], [], [], []
    token_logits = torch.empty(int(picked.numel()), vocab, dtype=acc, device=device)
    distilled: list[tuple[Tensor, ...]] = []
    block = max(1, BLOCK_ENTRIES // max(vocab, 1))
    # the two [block, V] buffers, allocated once: a fresh one per block costs its page faults
    buffers = torch.empty(2, min(block, m), vocab, dtype=acc, device=device)
    with torch.no_grad():
        for start in range(0, m, block):
            h_block = hidden[start : start + block]
            z = buffers[0, : h_block.shape[0]]  # [b, V]
            if weight.dtype == acc:
                torch.matmul(h_block, weight.T, out=z)
            else:  # bf16/fp16: the operand dtype's product, then the softmax dtype
                z.copy_(compute_logits(h_block, weight))
            span = slice(start, start + z.shape[0])
            here = (picked >= span.start) & (picked < span.stop)
            token_logits[here] = z[picked[here] - start]
            y = tokens[span, None]
            z_y = z.gather(-1, y).squeeze(-1)
            top = z.amax(-1, keepdim=True)  # [b, 1]
            d = z.sub_(top)  # z holds d = z − max ≤ 0 from here
            d_rows = d[:, rows]  # [b, R]
            e = floored_exp(d, out=buffers[1, : d.shape[0]])  # [b, V]
            e_rows = e[:, rows]
            e[:, rows] = 0.0  # the rows outside R from here
            s_rest = e.sum(-1)
            u_rest = torch.linalg.vecdot(e, d)
            s_all = s_rest + e_rows.sum(-1)
            log_s = s_all.log()
            top = top.squeeze(-1)
            logit_y.append(z_y)
            logp.append((z_y - top) - log_s)
            entropy.append(log_s - (u_rest + torch.linalg.vecdot(e_rows, d_rows)) / s_all)
            rest_lse.append(top + s_rest.log())  # −inf when R holds every row
            mean = torch.where(s_rest > 0, u_rest / s_rest, 0.0)
            rest_mean.append(torch.where(s_rest > 0, top + mean, 0.0))
            if distill is not None:
                log_p = d.sub_(log_s[:, None])  # [b, V] log π
                distilled.append(distill_block(distill, log_p, span, rows, outside))
            del z, d, e
    del buffers
    empty = torch.zeros(0, dtype=acc, device=device)

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if parts else empty

    constants = None
    if distill is not None:
        if not distilled:  # no valid token
            r = int(rows.numel())
            distilled = [(empty, empty, empty, empty.reshape(0, r), empty.reshape(0, r).bool())]
        value, rest_value, rest_psi, lq_rows, in_support = (
            torch.cat(parts) for parts in zip(*distilled, strict=True)
        )
        constants = DistillSample(
            distill.d,
            distill.teacher,
            distill.grid_rows,
            distill.grid_cols,
            value,
            rest_value,
            rest_psi,
            lq_rows,
            in_support,
        )
    return Sample(
        picked,
        rows,
        cat(rest_lse),
        cat(rest_mean),
        cat(logit_y),
        cat(logp),
        cat(entropy),
        constants,
        token_logits=token_logits,
    )


def _weighted(parts_lse: Tensor, parts_mean: Tensor) -> tuple[Tensor, Tensor]:
    """[P, M] logsumexps and means of P parts → [M] the logsumexp and the mean of the whole,
    each part's mean weighted by e^{lse_r − lse}; a part with no entry (lse_r = −inf) weighs 0,
    and a whole with none gives −inf and 0."""
    lse = torch.logsumexp(parts_lse, 0)
    base = torch.where(torch.isfinite(lse), lse, 0.0)
    return lse, (torch.exp(parts_lse - base) * parts_mean).sum(0)


def _lse_mean(z: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """[b] logsumexp and e^{z − lse}-weighted mean of z over the entries ``keep`` holds (all for
    None); −inf and 0 for a row with none."""
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    base = torch.where(torch.isfinite(lse), lse, 0.0)
    w = torch.exp(z - base[:, None])  # 0 outside ``keep``
    return lse, (w * torch.where(w > 0, z, 0.0)).sum(-1)


def choose_sample_parallel(
    hidden: Tensor,
    weight_shard: Tensor,
    tokens: Tensor,
    c_abs: Tensor,
    row_norms: Tensor,
    comm: Collectives,
    split: VocabSplit,
) -> Sample:
    """`choose_sample` on a tensor-parallel group, this rank holding ``weight_shard`` = rows
    ``split.shard(comm.rank)`` of W: two all_gathers (module docstring); the same `Sample` on
    every rank, with W_R and the sampled tokens' ρ'_t, μ'_t."""
    m = int(tokens.numel())
    device = weight_shard.device
    picked, rows = sample_of(tokens, c_abs, row_norms)
    v0, v1 = split.shard(comm.rank)
    outside = torch.ones(v1 - v0, dtype=torch.bool, device=device)
    mine = rows[(rows >= v0) & (rows < v1)] - v0
    outside[mine] = False
    local_y = tokens - v0
    owns = (local_y >= 0) & (local_y < v1 - v0)
    acc = softmax_dtype(weight_shard.dtype)
    parts = []
    block = max(1, BLOCK_ENTRIES // max(v1 - v0, 1))
    with torch.no_grad():
        for start in range(0, m, block):
            z = compute_logits(hidden[start : start + block], weight_shard)  # [b, V_r]
            y = local_y[start : start + block]
            own = owns[start : start + block]
            at_y = torch.zeros_like(z, dtype=torch.bool)
            at_y[own, y[own]] = True
            z_y = torch.where(own, z.gather(-1, y.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            parts.append(
                torch.stack(
                    [
                        *_lse_mean(z, None),  # the shard: lse_r and Σ π z over it
                        *_lse_mean(z, outside.expand_as(z)),  # its rows outside R
                        *_lse_mean(z, ~at_y),  # its rows other than y_t
                        z_y,
                    ],
                    dim=-1,
                )
            )
    mine_parts = torch.cat(parts) if parts else torch.zeros(0, 7, dtype=acc, device=device)
    every = comm.all_gather(mine_parts, "sampled.constants")  # [P, M, 7]
    lse, mean = _weighted(every[..., 0], every[..., 1])
    rest_lse, rest_mean = _weighted(every[..., 2], every[..., 3])
    other_lse, other_mean = _weighted(every[..., 4], every[..., 5])
    logit_y = every[..., 6].sum(0)  # the owner's z_y, the others' 0
    return Sample(
        tokens=picked,
        rows=rows,
        rest_lse=rest_lse,
        rest_mean=rest_mean,
        logit_y=logit_y,
        logp=logit_y - lse,
        entropy=lse - mean,  # H = lse − Σ_v π_v z_v
        row_weights=_gather_rows(weight_shard, rows, comm, split),
        other_lse=other_lse,
        other_mean=other_mean,
    )


def _gather_rows(
    weight_shard: Tensor, rows: Tensor, comm: Collectives, split: VocabSplit
) -> Tensor:
    """[R, H] W_R on every rank: one all_gather of each rank's rows of R, padded to the largest
    count (every rank knows every rank's count from R and the split), then taken in rank order,
    which is R's order (R sorted, the ranks' rows consecutive)."""
    counts = [
        int(((rows >= a) & (rows < b)).sum())
        for a, b in (split.shard(r) for r in range(split.world))
    ]
    v0, v1 = split.shard(comm.rank)
    mine = weight_shard[rows[(rows >= v0) & (rows < v1)] - v0]  # [R_r, H]
    padded = torch.zeros(max(counts), weight_shard.shape[1], dtype=mine.dtype, device=mine.device)
    padded[: mine.shape[0]] = mine
    every = comm.all_gather(padded, "sampled.rows")  # [P, max R_r, H]
    return torch.cat([every[r, :n] for r, n in enumerate(counts)])


def sampled_reference(
    sample: Sample,
    batch: Batch,
    hidden: Tensor,
    tokens: Tensor,
    rows: Tensor,
    cols: Tensor,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    selection: Tensor | None = None,
) -> SampledReference:
    """One loss differentiated by autograd with respect to ℓ, the sampled logits and the
    sampled rows (see the module docstring); ``hidden`` [M, H] and ``tokens`` [M] are the valid
    tokens', ``rows``/``cols`` their places on the [N, T] grid; ``selection``: the engine's
    top-entropy selection S_t, taken as given (`gradlens.grads.Objective.selection`)."""
    shape = batch.mask.shape
    weight = batch.weight
    bonus = params.entropy_coef != 0.0  # H_t differentiated; only read (detached) otherwise
    reads = reads_entropy([spec], params)
    with torch.enable_grad():
        # 1. ∂L/∂W_R and c_t: ℓ through the sampled rows, the other rows a constant ρ.
        source = weight[sample.rows] if sample.row_weights is None else sample.row_weights
        w_rows = source.detach().clone().requires_grad_(True)  # [R, H]
        z_rows = compute_logits(hidden, w_rows)  # [M, R]
        lse = torch.logaddexp(torch.logsumexp(z_rows, dim=-1), sample.rest_lse)  # [M]
        where = torch.searchsorted(sample.rows, tokens)  # [M] the place of y_t in R, if there
        inside = (where < sample.rows.numel()) & (
            sample.rows[where.clamp(max=sample.rows.numel() - 1)] == tokens
        )
        z_y_rows = z_rows.gather(-1, where.clamp(max=sample.rows.numel() - 1)[:, None])[:, 0]
        z_y = torch.where(inside, z_y_rows, sample.logit_y)  # [M]
        logp = on_grid(z_y - lse, rows, cols, shape)
        logp.retain_grad()
        entropy = None
        if reads:
            p_rows = torch.exp(z_rows - lse[:, None])
            rest = torch.exp(sample.rest_lse - lse) * sample.rest_mean
            entropy = on_grid(lse - (p_rows * z_rows).sum(-1) - rest, rows, cols, shape)
            entropy = entropy if bonus else entropy.detach()
        divergence = None
        ds = sample.distill
        if ds is not None:
            phi, _ = entry_terms(z_rows - lse[:, None], ds.lq_rows.to(z_rows.dtype), ds.d)
            on_rows = torch.where(ds.in_support, phi, 0.0).sum(-1)  # [M]
            values = on_rows + ds.rest_value - (lse - lse.detach()) * ds.rest_psi
            divergence = on_grid(values, rows, cols, shape)
        loss = objective(
            batch, logp, spec, params, aggregation, entropy, divergence, selection
        ).loss
        loss.backward()
        assert logp.grad is not None and w_rows.grad is not None
        coefficient, grad_rows = logp.grad, w_rows.grad
        # the size of each sampled row's terms c_t·(e_y − π_t)_v·h_t (`gradlens.diagnostics.
        # agreement`): what the engine and this reference may differ by through rounding
        # (|∂L/∂z_t,v| taken as |c_t|·π_t,v, the c-form's; the sampled token's own row only
        # for the tokens whose y_t is in R)
        c_abs = coefficient.detach()[rows, cols].double().abs()  # [M]
        p_rows = torch.exp(z_rows.detach() - lse.detach()[:, None]).double()  # [M, R]
        scales = row_scales(
            c_abs[:, None] * p_rows,
            c_abs * inside,
            where.clamp(max=sample.rows.numel() - 1),
            hidden.detach().double().norm(dim=-1),
        )

        # 2. ∂L/∂z of the sampled tokens, the others' ℓ (and H) constants of the pass.
        if sample.other_lse is None:
            z_tok = sample.token_logits
            if z_tok is None:
                z_tok = compute_logits(hidden[sample.tokens], weight)
            z_tok = z_tok.detach().requires_grad_(True)  # a new leaf on the same numbers
            log_p = torch.log_softmax(z_tok, dim=-1)  # [S, V]
            picked_logp = log_p.gather(-1, tokens[sample.tokens, None])[:, 0]
            picked_entropy = -(log_p.exp() * log_p).sum(-1)
            leaf = z_tok
        else:  # tensor parallelism: through z_y and the constants of the row's other entries
            assert ds is None, "the vocab-parallel engine carries no distillation term"
            picked_logp, picked_entropy, leaf = _split_rows(sample)
        ell = sample.logp.index_put((sample.tokens,), picked_logp)
        entropy2 = None
        if reads:
            ent = sample.entropy.index_put((sample.tokens,), picked_entropy)
            entropy2 = on_grid(ent, rows, cols, shape)
            entropy2 = entropy2 if bonus else entropy2.detach()
        divergence2 = None
        if ds is not None:
            teacher = teacher_tokens(
                ds.teacher,
                ds.grid_rows[sample.tokens],
                ds.grid_cols[sample.tokens],
                ds.d,
                int(weight.shape[0]),
                log_p.dtype,
            )
            picked_value = token_value(log_p, teacher, ds.d)  # [S], over the whole row
            divergence2 = on_grid(
                ds.value.index_put((sample.tokens,), picked_value), rows, cols, shape
            )
        loss2 = objective(
            batch,
            on_grid(ell, rows, cols, shape),
            spec,
            params,
            aggregation,
            entropy2,
            divergence2,
            selection,
        ).loss
        loss2.backward()
        assert leaf.grad is not None
        grad_z = leaf.grad
        if sample.other_lse is None:  # [S, V]: the sampled entries
            at_y = grad_z.gather(-1, tokens[sample.tokens, None])[:, 0]
        else:  # [S]: ∂L/∂z_{t,y_t} itself
            at_y = grad_z
    norms = grad_rows.double().norm(dim=1)
    non_finite = int((~torch.isfinite(grad_rows)).sum() + (~torch.isfinite(grad_z)).sum())
    return SampledReference(coefficient.detach(), at_y.detach(), norms, non_finite, scales)


def _split_rows(sample: Sample) -> tuple[Tensor, Tensor, Tensor]:
    """ℓ_t and H_t of the sampled tokens through z_{t,y_t} (the leaf, [S]) and the constants
    ρ'_t, μ'_t of the other entries: lse = log(e^{z_y} + e^{ρ'}), H = lse − π_y z_y − e^{ρ'−lse} μ'
    — the whole row's functions of z_y, so autograd gives the whole row's ∂L/∂z_y."""
    assert sample.other_lse is not None and sample.other_mean is not None
    z_y = sample.logit_y[sample.tokens].detach().clone().requires_grad_(True)  # [S]
    rho, mu = sample.other_lse[sample.tokens], sample.other_mean[sample.tokens]
    lse = torch.logaddexp(z_y, rho)
    entropy = lse - torch.exp(z_y - lse) * z_y - torch.exp(rho - lse) * mu
    return z_y - lse, entropy, z_y
