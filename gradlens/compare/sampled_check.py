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

Cost: that pass (one GEMM of M×V×H, shared by every loss; with a teacher pair one more), then
per loss [M, |R|] and [|S|, V] under autograd. The samples are fixed by the batch (no random
draw), so a run repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch, Teacher
from gradlens.grads import objective, on_grid, reads_entropy
from gradlens.logits import compute_logits, softmax_dtype
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.losses.base import Distill
from gradlens.losses.distill import entry_terms, student_at, teacher_tokens, token_value

SAMPLED_TOKENS = 64  # tokens whose whole logit row is differentiated
TOP_ROWS = 32  # lm_head rows of largest gradient norm in the engine's result
SPREAD_ROWS = 32  # lm_head rows evenly spaced over the vocabulary
BLOCK_ENTRIES = 1 << 24  # tokens × vocabulary entries of one block of the constant pass


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
    """

    tokens: Tensor
    rows: Tensor
    rest_lse: Tensor
    rest_mean: Tensor
    logit_y: Tensor
    logp: Tensor
    entropy: Tensor
    distill: DistillSample | None = None


@dataclass(frozen=True)
class SampledReference:
    """One loss by autograd on the sample."""

    coefficient: Tensor  # [N, T] ∂L/∂ℓ_t
    grad_at_y: Tensor  # [S] ∂L/∂z_{t,y_t} of the sampled tokens
    row_norms: Tensor  # [R] ‖∂L/∂W_v‖ of the sampled rows
    non_finite: int  # NaN/inf entries among those gradients


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


def choose_sample(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    c_abs: Tensor,
    row_norms: Tensor,
    distill: DistillInputs | None = None,
) -> Sample:
    """The sample and the constant pass over all logits (see the module docstring)."""
    m, vocab = int(tokens.numel()), int(weight.shape[0])
    device = weight.device
    picked = evenly(SAMPLED_TOKENS, m).to(device)
    if m:
        picked = torch.cat([picked, c_abs.argmax().reshape(1)]).unique()
    top = row_norms.double().nan_to_num(posinf=1e300).topk(min(TOP_ROWS, vocab)).indices
    rows = torch.cat([top.to(device), tokens[picked], evenly(SPREAD_ROWS, vocab).to(device)])
    rows = rows.unique()  # sorted
    outside = torch.ones(vocab, dtype=torch.bool, device=device)
    outside[rows] = False
    acc = softmax_dtype(weight.dtype)
    rest_lse, rest_mean, logit_y, logp, entropy = [], [], [], [], []
    distilled: list[tuple[Tensor, ...]] = []
    block = max(1, BLOCK_ENTRIES // max(vocab, 1))
    with torch.no_grad():
        for start in range(0, m, block):
            z = compute_logits(hidden[start : start + block], weight)  # [b, V]
            lse = torch.logsumexp(z, dim=-1)
            log_p = z - lse[:, None]
            y = tokens[start : start + block, None]
            logit_y.append(z.gather(-1, y).squeeze(-1))
            logp.append(log_p.gather(-1, y).squeeze(-1))
            entropy.append(-(log_p.exp() * log_p).sum(-1))
            rest = z.masked_fill(~outside, float("-inf"))
            rho = torch.logsumexp(rest, dim=-1)
            rest_lse.append(rho)
            weights = torch.exp(rest - rho[:, None])  # 0 at the rows of R
            rest_mean.append((weights * z.masked_fill(~outside, 0.0)).sum(-1))
            if distill is not None:
                span = slice(start, start + block)
                distilled.append(distill_block(distill, log_p, span, rows, outside))
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
    )


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
) -> SampledReference:
    """One loss differentiated by autograd with respect to ℓ, the sampled logits and the
    sampled rows (see the module docstring); ``hidden`` [M, H] and ``tokens`` [M] are the valid
    tokens', ``rows``/``cols`` their places on the [N, T] grid."""
    shape = batch.mask.shape
    weight = batch.weight
    bonus = params.entropy_coef != 0.0  # H_t differentiated; only read (detached) otherwise
    reads = reads_entropy([spec], params)
    with torch.enable_grad():
        # 1. ∂L/∂W_R and c_t: ℓ through the sampled rows, the other rows a constant ρ.
        w_rows = weight[sample.rows].detach().clone().requires_grad_(True)  # [R, H]
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
        loss = objective(batch, logp, spec, params, aggregation, entropy, divergence).loss
        loss.backward()
        assert logp.grad is not None and w_rows.grad is not None
        coefficient, grad_rows = logp.grad, w_rows.grad

        # 2. ∂L/∂z of the sampled tokens, the others' ℓ (and H) constants of the pass.
        z_tok = compute_logits(hidden[sample.tokens], weight).detach().requires_grad_(True)
        log_p = torch.log_softmax(z_tok, dim=-1)  # [S, V]
        picked_logp = log_p.gather(-1, tokens[sample.tokens, None])[:, 0]
        ell = sample.logp.index_put((sample.tokens,), picked_logp)
        entropy2 = None
        if reads:
            ent = sample.entropy.index_put((sample.tokens,), -(log_p.exp() * log_p).sum(-1))
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
            batch, on_grid(ell, rows, cols, shape), spec, params, aggregation, entropy2, divergence2
        ).loss
        loss2.backward()
        assert z_tok.grad is not None
        at_y = z_tok.grad.gather(-1, tokens[sample.tokens, None])[:, 0]
    norms = grad_rows.double().norm(dim=1)
    non_finite = int((~torch.isfinite(grad_rows)).sum() + (~torch.isfinite(z_tok.grad)).sum())
    return SampledReference(coefficient.detach(), at_y.detach(), norms, non_finite)
