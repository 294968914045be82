"""The materialized engine: every loss's [M, V] logit gradient and [V, H] lm_head gradient.

One `softmax_view` of the valid tokens is shared by every loss; each loss's gradients come from
the master identity (`gradlens.grads.closed_form`), and with the reference on, from autograd
too (`autograd_reference`), and the diagnostics read the full tensors. Meant for batches whose
tokens × vocabulary fit in memory; `gradlens.compare.streamed` does the rest.

With ``diagnostics.attribution`` the attribution sums come from the same tensors, as one chunk
covering the whole vocabulary (`gradlens.engine.attribution`, the streamed engine's code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.compare.engines import EngineOptions, EngineRun
from gradlens.compare.parity import materialized_inputs
from gradlens.compare.records import LossRecord, TokenSummary
from gradlens.containers import Batch
from gradlens.diagnostics.agreement import agreement, not_run
from gradlens.diagnostics.attribution import AttributionInputs
from gradlens.diagnostics.numbers import count_non_finite
from gradlens.diagnostics.row_norms import row_norms
from gradlens.diagnostics.sampled_row import sampled_row
from gradlens.diagnostics.tokens import token_details
from gradlens.diagnostics.zero_sum import zero_sum
from gradlens.engine.attribution import (
    LossSums,
    SequenceLayout,
    TokenSums,
    entropy_direction,
    sequence_layout,
)
from gradlens.engine.norms import safe_row_norms
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
    shared = shared_attribution(batch, view) if options.attribution else None
    records = [
        loss_record(batch, view, spec, params, aggregation, options, shared) for spec in specs
    ]
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
    shared: SharedAttribution | None = None,
) -> LossRecord:
    """Gradients of one loss, its autograd twin, and the diagnostics that read them (and its
    attribution with ``shared``)."""
    grads = closed_form(batch, view, spec, params, aggregation)
    full = options.reference != "none"  # small enough to check every token and row
    selection = grads.objective.selection  # the closed form's S_t, for the same loss
    reference = autograd_reference(batch, spec, params, aggregation, selection) if full else None
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
            entropy_bonus=grads.entropy_grad_logits is not None,
        ),
        agreement=not_run(dtype)
        if reference is None
        else agreement(grads, reference, batch.mask, dtype, view.hidden, view.tokens),
        tokens=token_details(batch, view, grads) if options.token_details else None,
        attribution=None if shared is None else loss_attribution(view, grads, shared),
    )


@dataclass(frozen=True)
class SharedAttribution:
    """What every loss's attribution shares: π's entropy direction d [M, V], the per-token sums,
    the sequences' layout, h in the softmax dtype [M, H] and its norms [M]."""

    direction: Tensor
    tokens: TokenSums
    layout: SequenceLayout
    hidden: Tensor
    hidden_norm: Tensor


def shared_attribution(batch: Batch, view: SoftmaxView) -> SharedAttribution:
    """The loss-independent part of the attribution, from the batch's softmax."""
    m = view.tokens.numel()
    probs = view.probs
    hidden = view.hidden.to(probs.dtype)
    d = entropy_direction(torch.log_softmax(view.logits, dim=-1), probs, view.entropy)  # [M, V]
    inside = torch.arange(m, device=probs.device)
    tokens = TokenSums.zeros(m, probs.dtype, probs.device)
    tokens.add(probs, d, inside, view.tokens)
    layout = sequence_layout(view.rows, batch.num_sequences, hidden)
    return SharedAttribution(d, tokens, layout, hidden, safe_row_norms(hidden))


def loss_attribution(
    view: SoftmaxView, grads: LossGradients, shared: SharedAttribution
) -> AttributionInputs:
    """One loss's attribution sums: the whole vocabulary as one chunk."""
    m = view.tokens.numel()
    probs = view.probs
    sums = LossSums.zeros(m, shared.layout.num_sequences, probs.dtype, probs.device)
    inside = torch.arange(m, device=probs.device)
    sums.add(
        grads.grad_weight,
        shared.hidden,
        probs,
        shared.direction,
        grads.grad_logits,
        inside,
        view.tokens,
        shared.layout,
    )
    return AttributionInputs(
        sums=sums,
        tokens=shared.tokens,
        grad_norm_sq=grads.grad_weight.double().square().sum(),
        entropy=view.entropy,
        logp=view.logp[view.rows, view.cols],
        hidden_norm=shared.hidden_norm,
    )


def zero_sum_scale(grads: LossGradients, view: SoftmaxView, params: LossParams) -> torch.Tensor:
    """[M] |c_t|, plus the gross size 2·|c_H|·a_t·S_t·H_t of the entropy bonus's cancelling terms
    Σ_v π_v·|log π_v + H| ≤ 2H, and the distillation term's: the zero-sum bound is relative to
    what cancels."""
    c_valid = grads.coefficient[view.rows, view.cols]
    if grads.entropy_grad_logits is None and grads.distill_scale is None:
        return c_valid
    scale = c_valid.abs()
    if grads.entropy_grad_logits is not None:
        a = grads.bonus_weights[view.rows, view.cols].to(view.entropy.dtype)  # a_t·S_t
        scale = scale + 2 * abs(params.entropy_coef) * a * view.entropy
    if grads.distill_scale is not None:  # λ·a_t·2Σ_v|u_tv| of the distillation term
        scale = scale + grads.distill_scale.to(scale.dtype)
    return scale


def estimate_materialized(
    shape: Shape, dtype: torch.dtype, reference: bool, attribution: bool = False
) -> Estimate:
    """The engine's peak: the shared [M, V] logits and probabilities in the softmax dtype; one
    loss at a time, its ∂L/∂z [M, V] and the float64 copy (with its absolute value) the
    zero-sum check reduces; with the reference, autograd's [M, V] logits, log-softmax, their
    gradients and backward temporaries (five [M, V] tensors, measured); ∂L/∂W [V, H] of both;
    with the attribution, the entropy direction d, one loss's G h_t and a temporary ([M, V]
    each) and the hidden states' Gram of each sequence (about M·T entries)."""
    m, v, h = shape.tokens, shape.vocab, shape.hidden
    acc = dtype_bytes(softmax_dtype(dtype))
    terms = [
        ("logits and probabilities [M, V]", 2 * m * v * acc),
        ("one loss's ∂L/∂z [M, V] and its float64 zero-sum copies", m * v * (acc + 16)),
        ("∂L/∂W [V, H]", 2 * v * h * acc),
    ]
    if reference:
        terms.append(("autograd's [M, V] tensors of one loss", 5 * m * v * acc))
    if attribution:
        terms.append(("attribution: d, G h_t and a temporary [M, V]", 3 * m * v * acc))
        terms.append(("attribution: each sequence's Gram of h", m * shape.length * acc))
    return Estimate(
        "the materialized engine",
        "tokens × vocabulary (diagnostics.engine: streamed keeps nothing of that size)",
        tuple(terms),
    )
