"""What each engine hands back, per loss and per token, and the one builder of a `LossReport`.

Both engines (`gradlens.compare.materialized`, `gradlens.compare.streamed`) compute the
diagnostics that need the logits their own way — the materialized one from [M, V] and [V, H]
tensors, the streamed one from per-token statistics and per-row reductions — and return them in
a `LossRecord` beside the loss's `Objective`. Everything that follows from the objective alone
(the coefficient statistics, the clip fractions, the metrics, the findings) is computed here,
once, for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from gradlens.compare.findings import attribution_notes, findings, input_notes, signal
from gradlens.containers import Batch, valid_index
from gradlens.diagnostics.agreement import weight_unjudged
from gradlens.diagnostics.attribution import AttributionInputs, attribution
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.metrics import terms_metrics
from gradlens.diagnostics.numbers import num
from gradlens.diagnostics.token_text import TokenTexts
from gradlens.grads import Objective, on_grid
from gradlens.losses import LossParams, LossSpec
from gradlens.results import Agreement, LossReport, RowNorms, SampledRow, TokenDetail, ZeroSum


@dataclass(frozen=True)
class TokenSummary:
    """The per-token quantities of the lm_head pass the estimate reads, from either engine.

    Attributes:
        logp: [N, T] ℓ_t = log π_θ(y_t) (0 at masked positions).
        entropy: [M] H(π_t) of the valid tokens.
        sampled_probs: [M] π_t(y_t) of the valid tokens.
    """

    logp: Tensor
    entropy: Tensor
    sampled_probs: Tensor

    def entropy_grid(self, mask: Tensor) -> Tensor:
        """[N, T] H_t on the batch's grid (``mask`` [N, T]), 0 off the mask."""
        return on_grid(self.entropy, *valid_index(mask), mask.shape)


@dataclass(frozen=True)
class LossRecord:
    """One loss's diagnosis by one engine.

    Attributes:
        spec: the loss.
        objective: its terms, weights and coefficients c_t on the [N, T] grid.
        loss: the aggregated loss value L (with the entropy bonus, when one is set).
        non_finite: non-finite entries among the engine's gradients (or their reductions).
        reference_non_finite: non-finite entries in the autograd reference's gradients.
        sampled_row, rows, zero_sum, agreement: the diagnostics that need the logits.
        tokens: every token in full (small materialized batches), or None.
        attribution: the engine's attribution sums, or None (``diagnostics.attribution``).
    """

    spec: LossSpec
    objective: Objective
    loss: float
    non_finite: int
    reference_non_finite: int
    sampled_row: SampledRow
    rows: RowNorms
    zero_sum: ZeroSum
    agreement: Agreement
    tokens: list[TokenDetail] | None = None
    attribution: AttributionInputs | None = None


def loss_report(
    record: LossRecord,
    batch: Batch,
    logp: Tensor,
    params: LossParams,
    top_k: int = 10,
    texts: TokenTexts | None = None,
) -> LossReport:
    """The report of one loss; ``logp`` is [N, T] ℓ_t as the engine computed it; ``top_k``
    sequences and tokens in its attribution, decoded by ``texts`` when given."""
    spec, obj = record.spec, record.objective
    c_valid = obj.coefficient[batch.mask]
    empty = c_valid.numel() == 0
    sig = signal(batch, logp, obj, spec, params, record.rows.total_norm)
    agreement = record.agreement
    if sig.from_inputs and agreement.ran:  # ∂L/∂W zero or rounding: diagnosable says why
        agreement = weight_unjudged(agreement)
    report = LossReport(
        name=spec.name,
        formula=spec.formula,
        per_token_grad_formula=spec.grad_formula,
        loss=num(record.loss),
        coefficient_abs_mean=None if empty else num(c_valid.abs().mean()),
        coefficient_abs_max=None if empty else num(c_valid.abs().max()),
        non_finite=record.non_finite,
        signal=sig,
        reference_non_finite=record.reference_non_finite,
        sampled_row=record.sampled_row,
        rows=record.rows,
        zero_sum=record.zero_sum,
        clipping=clipping(obj.terms.regions, obj.coefficient, batch.mask),
        agreement=agreement,
        findings=[],
        tokens=record.tokens,
        metrics=terms_metrics(obj.terms, obj.agg_weights),
        attribution=None
        if record.attribution is None
        else attribution(record.attribution, obj, batch, logp, params.entropy_coef, top_k, texts),
    )
    notes = findings(report, batch, logp, obj, spec)
    notes += attribution_notes(report, batch.num_sequences, record.attribution is not None)
    notes += input_notes(spec, batch, obj.terms, params)
    return report.model_copy(update={"findings": notes})
