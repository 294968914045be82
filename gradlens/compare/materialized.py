"""The materialized engine: every loss's [M, V] logit gradient and [V, H] lm_head gradient.

One `softmax_view` of the valid tokens is shared by every loss; each loss's gradients come from
the master identity (`gradlens.grads.closed_form`), and with the reference on, from autograd
too (`autograd_reference`), and the diagnostics read the full tensors. Meant for batches whose
tokens × vocabulary fit in memory; `gradlens.compare.streamed` does the rest.
"""

from __future__ import annotations

import torch

from gradlens.compare.engines import EngineOptions, EngineRun
from gradlens.compare.parity import materialized_inputs
from gradlens.compare.records import LossRecord, TokenSummary
from gradlens.containers import Batch
from gradlens.diagnostics.agreement import agreement, not_run
from gradlens.diagnostics.numbers import count_non_finite
from gradlens.diagnostics.row_norms import row_norms
from gradlens.diagnostics.sampled_row import sampled_row
from gradlens.diagnostics.tokens import token_details
from gradlens.diagnostics.zero_sum import zero_sum
from gradlens.grads import LossGradients, SoftmaxView, autograd_reference, closed_form, softmax_view
from gradlens.logits import softmax_dtype
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.memory import Estimate, Shape, dtype_bytes
from gradlens.results import EngineInfo


def run_materialized(
    batch: Batch,
    specs: list[LossSpec],
    params: LossParams,
    aggregation: Aggregation,
    options: EngineOptions,
    reason: str,
    pairs: list[tuple[LossSpec, LossSpec]] | None = None,
) -> EngineRun:
    """Every loss of ``specs`` on ``batch``; parity's inputs for each of ``pairs``."""
    view = softmax_view(batch)
    records = [loss_record(batch, view, spec, params, aggregation, options) for spec in specs]
    parity = [materialized_inputs(batch, view, a, b, params, aggregation) for a, b in pairs or []]
    return EngineRun(
        records=records,
        tokens=TokenSummary(view.logp, view.entropy, view.sampled_probs),
        info=EngineInfo(path="materialized", reason=reason),
        parity=parity,
    )


def loss_record(
    batch: Batch,
    view: SoftmaxView,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    options: EngineOptions,
) -> LossRecord:
    """Gradients of one loss, its autograd twin, and the diagnostics that read them."""
    grads = closed_form(batch, view, spec, params, aggregation)
    reference = autograd_reference(batch, spec, params, aggregation) if options.reference else None
    dtype = batch.weight.dtype
    return LossRecord(
        spec=spec,
        objective=grads.objective,
        loss=grads.loss,
        non_finite=count_non_finite(grads.grad_logits, grads.grad_weight),
        reference_non_finite=0
        if reference is None
        else count_non_finite(reference.grad_logits, reference.grad_weight),
        sampled_row=sampled_row(
            view, grads, None if reference is None else reference.grad_logits, spec.post_formula
        ),
        rows=row_norms(grads.grad_weight, view.tokens, options.top_k),
        zero_sum=zero_sum(
            grads.grad_logits,
            grads.grad_weight,
            zero_sum_scale(grads, view, params),
            view.hidden,
            view.logits,
        ),
        agreement=not_run(dtype)
        if reference is None
        else agreement(grads, reference, batch.mask, dtype),
        tokens=token_details(batch, view, grads) if options.token_details else None,
    )


def zero_sum_scale(grads: LossGradients, view: SoftmaxView, params: LossParams) -> torch.Tensor:
    """[M] |c_t|, plus the gross size 2·|c_H|·a_t·H_t of the entropy bonus's cancelling terms
    Σ_v π_v·|log π_v + H| ≤ 2H: the zero-sum bound is relative to what cancels."""
    c_valid = grads.coefficient[view.rows, view.cols]
    if grads.entropy_grad_logits is None:
        return c_valid
    a = grads.agg_weights[view.rows, view.cols].to(view.entropy.dtype)
    return c_valid.abs() + 2 * abs(params.entropy_coef) * a * view.entropy


def estimate_materialized(shape: Shape, dtype: torch.dtype, reference: bool) -> Estimate:
    """The engine's peak: the shared [M, V] logits and probabilities in the softmax dtype; one
    loss at a time, its ∂L/∂z [M, V] and the float64 copy (with its absolute value) the
    zero-sum check reduces; with the reference, autograd's [M, V] logits, log-softmax, their
    gradients and backward temporaries (five [M, V] tensors, measured); ∂L/∂W [V, H] of both."""
    m, v, h = shape.tokens, shape.vocab, shape.hidden
    acc = dtype_bytes(softmax_dtype(dtype))
    terms = [
        ("logits and probabilities [M, V]", 2 * m * v * acc),
        ("one loss's ∂L/∂z [M, V] and its float64 zero-sum copies", m * v * (acc + 16)),
        ("∂L/∂W [V, H]", 2 * v * h * acc),
    ]
    if reference:
        terms.append(("autograd's [M, V] tensors of one loss", 5 * m * v * acc))
    return Estimate(
        "the materialized engine",
        "tokens × vocabulary (diagnostics.engine: streamed keeps nothing of that size)",
        tuple(terms),
    )
