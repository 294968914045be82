"""The streamed path of `gradlens compare`: every loss's lm_head diagnosis from one engine run.

All losses share one pass over the logits (`gradlens.engine.streamed`): the engine hands the
sampled tokens' log-probs to `coefficients_for`, which runs each loss on the [N, T] grid exactly
as the materialized path does (same corrections, same aggregation weights), and gets back the
per-row norms and the row sum of each loss's ∂L/∂W. Nothing of size M×V or V×H is kept.

With ``diagnostics.reference: autograd`` each loss is also differentiated by torch.autograd
(which materialises [M, V], one loss at a time) and compared: c_t, the sampled-row logit
gradient ∂L/∂z_y and the row norms ‖∂L/∂W_v‖.

With ``loss.entropy_coef`` ≠ 0 the engine adds the entropy bonus's gradient (not of the c-form)
to every loss's rows, and the reports include it exactly as the materialized path's do.

With ``--parity A,B`` the same run also gives parity's inputs (`gradlens.parity`): A and B join
the engine's losses if they are not among them (without a loss report of their own), and one
more coefficient set, c_B − c_A, gives the row norms of ∂L_B/∂W − ∂L_A/∂W, which is of the same
c-form. The logit-gradient gap follows from c_A, c_B and per-token statistics (`streamed_gap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.config import Config
from gradlens.containers import Batch, LossTerms, valid_index
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.agreement import not_run
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.metrics import terms_metrics
from gradlens.diagnostics.numbers import count_non_finite, num, rel_err
from gradlens.diagnostics.row_norms import row_norms_from
from gradlens.diagnostics.streamed import grad_at_y, sampled_row_streamed, zero_sum_streamed
from gradlens.engine.streamed import (
    EngineResult,
    auto_budget,
    dense_dtype,
    lm_head_pass,
    plan,
)
from gradlens.grads import (
    Aggregation,
    autograd_reference,
    loss_terms,
    loss_weights,
    run_params,
    token_inputs,
)
from gradlens.logits import softmax_dtype
from gradlens.losses import LossParams, LossSpec, aggregation_weights, get_loss
from gradlens.parity import ParityGap, ParityLoss, streamed_gap
from gradlens.results import Agreement, EngineInfo, LossReport


@dataclass
class _Coefficients:
    """What the engine's callback computed for each loss (kept for the report)."""

    terms: list[LossTerms]
    weights: list[Tensor]  # [N, T] a_t (1 for a loss that aggregates itself)
    coefficient: list[Tensor]  # [N, T] c_t
    logp: Tensor | None = None  # [N, T] ℓ as the engine computed it


@dataclass(frozen=True)
class StreamedRun:
    """What the streamed path hands back to `run_compare`.

    Attributes:
        reports: one per loss of ``config.losses``, without findings.
        result: the engine's result (its coefficient sets and rows include parity's).
        logp: [N, T] ℓ_t as the engine computed it (0 at masked positions).
        info: how the engine ran.
        terms: each reported loss's terms.
        parity: the inputs of `build_parity` for the pair asked for, or None.
    """

    reports: list[LossReport]
    result: EngineResult
    logp: Tensor
    info: EngineInfo
    terms: list[LossTerms]
    parity: tuple[ParityLoss, ParityLoss, ParityGap] | None = None


def run_streamed(
    batch: Batch,
    config: Config,
    params: LossParams,
    agg: Aggregation,
    reason: str,
    pair: tuple[str, str] | None = None,
) -> StreamedRun:
    """Every loss of ``config`` through one engine run, and parity's inputs for ``pair``."""
    rows, cols = valid_index(batch.mask)
    hidden = batch.hidden[rows, cols]  # [M, H]
    tokens = batch.tokens[rows, cols]  # [M]
    names = list(config.losses)
    if pair is not None:
        names += [n for n in dict.fromkeys(pair) if n not in names]
    specs = [get_loss(n) for n in names]
    reported = len(config.losses)
    run = run_params(params, agg)
    kept = _Coefficients([], [], [])

    def coefficients_for(logp_valid: Tensor) -> list[Tensor]:
        logp = torch.zeros(batch.mask.shape, dtype=logp_valid.dtype, device=logp_valid.device)
        logp[rows, cols] = logp_valid
        kept.logp = logp
        inputs = token_inputs(batch, logp)
        out = []
        for spec in specs:
            terms = loss_terms(inputs, spec, run)
            weights, _ = loss_weights(batch.mask, terms, agg, logp.dtype)
            coefficient = weights * terms.coefficient
            kept.terms.append(terms)
            kept.weights.append(weights)
            kept.coefficient.append(coefficient)
            out.append(coefficient[rows, cols])
        if pair is not None:  # ∂L_B/∂W − ∂L_A/∂W is the c-form gradient of c_B − c_A
            a, b = (kept.coefficient[names.index(n)] for n in pair)
            out.append((b - a)[rows, cols])
        return out

    d = config.diagnostics
    budget = int(d.memory_budget_mib * 2**20) if d.memory_budget_mib else auto_budget(hidden.device)
    k = len(specs) + (pair is not None)
    buffers = 3 if run.entropy_coef == 0.0 else 4  # the bonus's [M, Vc] block: one more
    engine_plan = plan(
        tokens.numel(),
        batch.vocab_size,
        batch.hidden_size,
        k,
        budget,
        d.vocab_chunk,
        buffers=buffers,
    )
    # [N, T] the run's aggregation weights a_t: the loss metrics' and the entropy bonus's
    agg_weights = aggregation_weights(
        batch.mask, agg.mode, agg.loss_scale_factor, softmax_dtype(batch.weight.dtype)
    )
    entropy_weight = None  # w_t = a_t·c_H of the entropy bonus
    if run.entropy_coef != 0.0:
        entropy_weight = run.entropy_coef * agg_weights[rows, cols]
    result = lm_head_pass(
        hidden,
        batch.weight,
        tokens,
        coefficients_for,
        engine_plan,
        entropy_weight=entropy_weight,
        entropy_losses=len(specs),  # not parity's c_B − c_A: the bonus cancels there
    )
    # the bonus's part of the loss, −c_H·Σ_t a_t H_t, and its gross size 2·|c_H|·a_t·H_t
    bonus_loss, bonus_scale = 0.0, None
    if entropy_weight is not None:
        bonus_loss = -float((entropy_weight * result.tokens.entropy).sum())
        bonus_scale = 2 * entropy_weight.abs() * result.tokens.entropy
    assert kept.logp is not None
    hidden_norms = hidden.to(result.tokens.lse.dtype).norm(dim=-1)  # [M]
    reference = d.reference == "autograd"

    reports = []
    for i, spec in enumerate(specs[:reported]):
        c = result.coefficients[i]  # [M]
        rows_i = result.rows[i]
        terms, weights, coefficient = kept.terms[i], kept.weights[i], kept.coefficient[i]
        post = weights[rows, cols] * terms.coefficient[rows, cols].abs()
        post = post * (1 - result.tokens.sampled_prob)
        agreement, ref_at_y, ref_non_finite = (
            _agreement(batch, spec, params, agg, c, result, i, rows, cols, tokens)
            if reference
            else (not_run(batch.weight.dtype), None, 0)
        )
        reports.append(
            LossReport(
                name=spec.name,
                formula=spec.formula,
                coefficient_formula=spec.coefficient,
                loss=num(float((weights * terms.per_token).sum()) + bonus_loss),
                coefficient_abs_mean=num(c.abs().mean()) if c.numel() else None,
                coefficient_abs_max=num(c.abs().max()) if c.numel() else None,
                non_finite=count_non_finite(c, rows_i.norms, rows_i.row_sum),
                reference_non_finite=ref_non_finite,
                sampled_row=sampled_row_streamed(
                    c, result.tokens, spec.post_formula, post, ref_at_y, rows_i
                ),
                rows=row_norms_from(rows_i.norms, tokens, config.diagnostics.top_k),
                zero_sum=zero_sum_streamed(
                    c,
                    result.tokens,
                    rows_i.row_sum,
                    rows_i.norms,
                    hidden_norms,
                    batch.vocab_size,
                    dense_dtype(batch.hidden.dtype),
                    rows_i.other_max,
                    bonus_scale,
                    rows_i.gemm_scale,
                ),
                clipping=clipping(terms.regions, coefficient, batch.mask),
                agreement=agreement,
                findings=[],
                tokens=None,
                metrics=terms_metrics(terms, agg_weights),
            )
        )
    info = EngineInfo(
        path="streamed",
        reason=reason,
        vocab_chunk=engine_plan.vocab_chunk,
        resident_chunks=engine_plan.resident,
        budget_bytes=budget,
        gemm_equivalents=result.gemm_equivalents,
    )
    inputs = None
    if pair is not None:
        ia, ib = (names.index(n) for n in pair)
        a_max = None  # max_v |∂L_A/∂z_tv|, when the entropy bonus makes it other than |c_A|·u
        other_max = result.rows[ia].other_max
        if other_max is not None:
            at_y = grad_at_y(result.coefficients[ia], result.tokens).abs()
            a_max = torch.maximum(at_y, other_max)
        gap = streamed_gap(
            result.coefficients[ia],
            result.coefficients[ib],
            result.rows[-1].norms,
            result.tokens.sampled_prob,
            result.tokens.max_other_prob,
            a_max,
        )
        inputs = (
            _parity_loss(specs[ia], ia, kept, result, agg_weights, bonus_loss),
            _parity_loss(specs[ib], ib, kept, result, agg_weights, bonus_loss),
            gap,
        )
    return StreamedRun(reports, result, kept.logp, info, kept.terms[:reported], inputs)


def _parity_loss(
    spec: LossSpec,
    i: int,
    kept: _Coefficients,
    result: EngineResult,
    agg_weights: Tensor,
    bonus_loss: float,
) -> ParityLoss:
    """Loss ``i`` of the engine run as parity needs it: ‖∂L/∂W‖ from its row norms (the
    entropy bonus, ``bonus_loss`` of the loss, included as in the losses' own reports)."""
    terms, norms = kept.terms[i], result.rows[i].norms
    return ParityLoss(
        name=spec.name,
        loss=float((kept.weights[i] * terms.per_token).sum()) + bonus_loss,
        grad_norm=num(norms.double().norm()),
        rows=norms,
        coefficient=kept.coefficient[i],
        terms=terms,
        metrics=terms_metrics(terms, agg_weights),
    )


def _agreement(
    batch: Batch,
    spec,
    params: LossParams,
    agg: Aggregation,
    c: Tensor,
    result: EngineResult,
    i: int,
    rows: Tensor,
    cols: Tensor,
    tokens: Tensor,
) -> tuple[Agreement, Tensor, int]:
    """Engine against autograd: c_t, ∂L/∂z_y and the row norms (normwise relative)."""
    ref = autograd_reference(batch, spec, params, agg)
    ref_at_y = ref.grad_logits.gather(-1, tokens[:, None]).squeeze(-1)  # [M]
    at_y = grad_at_y(c, result.tokens)  # the entropy bonus's E_y included, as in autograd's
    errors = (
        rel_err(c, ref.coefficient[rows, cols]),
        rel_err(at_y, ref_at_y),
        rel_err(result.rows[i].norms, ref.grad_weight.double().norm(dim=1)),
    )
    tol = tolerances.agreement(batch.weight.dtype)
    return (
        Agreement(
            coefficient=errors[0],
            grad_logits=errors[1],
            grad_weight=errors[2],
            tolerance=tol,
            passed=all(e is not None and e <= tol for e in errors),
        ),
        ref_at_y,
        count_non_finite(ref.grad_logits, ref.grad_weight),
    )
