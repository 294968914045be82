"""Parity: do two implementations of "the same" loss give the same gradient on one batch?

Two losses A and B (built-in, user or verl-shaped) are run on the same batch, softmax and
aggregation. Both reach the logits only through ℓ_t, so their lm_head gradients are the same
linear map of their per-token coefficients c_t (losses.md §0): the gradients agree exactly when
the c_t do. Parity therefore judges

    coefficient_rel = max_t |c_t(A) − c_t(B)| / max_t max(|c_t(A)|, |c_t(B)|)  ≤ tolerance

(normwise, so tokens with tiny coefficients cannot inflate it), and reports beside it the
tokens that differ most, ‖∂L_B/∂W‖/‖∂L_A/∂W‖ (the number a grad_norm curve would show), the
largest difference of an lm_head row, the two loss values and both losses' clip fractions and
metrics. Loss *values* may differ by a constant without any effect on training, so they are
shown, not judged.

When the coefficients differ, the findings name the pattern where one fits exactly
(`gradlens.compare.parity_patterns`): two aggregations of the same surrogate, with their ratio
as a formula in the batch's counts (N_tok/(B'·|y_i|), B'/B, N_tok/N_kept: Liger-Kernel issue
1082's ~100× grad_norm was a normaliser); a constant factor; an epsilon on the sequence length;
a per-sequence factor; c_B/c_A = k·r_t^{±1} (an importance weight r = π_θ/π_old applied in one
and not the other); differences only on tokens one of them clips; float32 rounding.

Both engines feed one report builder, `build_parity`, with the same inputs (`ParityInputs`):
per loss its value, c_t on [N, T], terms, metrics, ‖∂L/∂W‖ and the row norms ‖∂L/∂W_v‖ [V]; for
the pair the largest row difference and the logit-gradient gap (`ParityGap`).
`materialized_inputs` computes them from the materialized gradients ([M, V] and [V, H] per
loss); the streamed engine (`gradlens.compare.streamed`) from one extra coefficient set and
per-token statistics, since ∂L_B/∂W − ∂L_A/∂W is itself of the c-form with coefficient c_B − c_A
(see `streamed_gap`).

Pure computation: a `ParityReport` out, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.compare.parity_patterns import (
    FLOAT32_GAP,
    PATTERN_RTOL,
    REJECTION_REGIONS,
    Pair,
    aggregation_notes,
    constant_factor,
    epsilon_note,
    is_constant,
    per_sequence_note,
)
from gradlens.containers import Batch, LossTerms
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.metrics import terms_metrics
from gradlens.diagnostics.numbers import max_ratio, num, rel_err
from gradlens.grads import LossGradients, SoftmaxView, closed_form, effective_old_logp
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.results import ParityPosition, ParityReport, ParitySide

TOP = 5  # positions listed


@dataclass(frozen=True)
class ParityLoss:
    """One loss of the pair as parity needs it, from either engine.

    Attributes:
        name: the loss's name.
        loss: the aggregated loss value L.
        grad_norm: ‖∂L/∂W‖_F.
        rows: [V] ‖∂L/∂W_v‖, the lm_head row norms.
        coefficient: [N, T] c_t = ∂L/∂ℓ_t (0 at masked positions).
        terms: the loss's terms (its clip regions, whether it aggregated itself).
        metrics: its per-token metrics aggregated and its reported numbers (`loss_metrics`).
    """

    name: str
    loss: float
    grad_norm: float | None
    rows: Tensor
    coefficient: Tensor
    terms: LossTerms
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class ParityGap:
    """How far B's gradients are from A's beyond the coefficients.

    Attributes:
        row_diff: max_v ‖∂L_B/∂W_v − ∂L_A/∂W_v‖ (NaN when a gradient is not finite).
        grad_logits_rel: max |∂L_B/∂z − ∂L_A/∂z| / max |∂L_A/∂z| over tokens and vocabulary
            (`rel_err`).
    """

    row_diff: float
    grad_logits_rel: float | None


def streamed_gap(
    ca: Tensor,
    cb: Tensor,
    row_diff: Tensor,
    sampled_prob: Tensor,
    max_other_prob: Tensor,
    a_max: Tensor | None = None,
) -> ParityGap:
    """`ParityGap` from per-token quantities, [M] each over the valid tokens, and the row
    norms ``row_diff`` [V] of the c-form gradient with coefficient c_B − c_A.

    ∂L/∂z_t = c_t·(e_y − π_t) for both losses, so every entry of ∂L_B/∂z − ∂L_A/∂z is
    (c_B,t − c_A,t)·(e_y − π_t)_v, and the largest over the vocabulary of |(e_y − π_t)_v| is
    u_t = max(1 − π_t(y), max_{v≠y} π_tv), which is 1 − π_t(y) = Σ_{v≠y} π_tv up to rounding.
    The factor u_t is common to A and B, so over all [M, V] entries

        max |∂L_B/∂z − ∂L_A/∂z| / max |∂L_A/∂z| = max_t |c_B,t − c_A,t|·u_t / max_t |c_A,t|·u_t,

    which is `rel_err` of c_B·u against c_A·u (with its handling of a zero A).

    With the entropy bonus, common to A and B, the difference is unchanged but max |∂L_A/∂z|
    is not |c_A|·u: ``a_max`` [M] gives max_v |∂L_A/∂z_tv| from the engine's statistics.
    """
    u = torch.maximum(1 - sampled_prob, max_other_prob).double()
    row_max = float(row_diff.double().max()) if row_diff.numel() else 0.0
    ca, cb = ca.double(), cb.double()
    scale = ca * u if a_max is None else a_max
    return ParityGap(row_diff=row_max, grad_logits_rel=max_ratio((cb - ca) * u, scale))


def _side(side: ParityLoss, mask: Tensor) -> ParitySide:
    return ParitySide(
        name=side.name,
        loss=num(side.loss),
        grad_norm=side.grad_norm,
        clipping=clipping(side.terms.regions, side.coefficient, mask),
        metrics=side.metrics,
    )


def _rejected(side: ParityLoss, mask: Tensor) -> Tensor:
    """[N, T] tokens a masking correction rejected in this loss (its regions)."""
    out = torch.zeros_like(mask)
    for name in REJECTION_REGIONS:
        region = side.terms.regions.get(name)
        if region is not None:
            out |= region & mask
    return out


def patterns(
    batch: Batch,
    logp: Tensor,
    ca: Tensor,
    cb: Tensor,
    tol: float,
    pair: Pair,
    coefficient_rel: float | None = None,
) -> list[str]:
    """Plain-language explanations of how c_B differs from c_A, where one fits exactly
    (`gradlens.compare.parity_patterns`, in the order its docstring gives).

    ``logp`` is [N, T] ℓ_t (for r_t = π_θ/π_old); ``ca``, ``cb`` are [N, T] c_t.
    """
    m = batch.mask
    a, b = ca[m].double(), cb[m].double()
    if a.numel() == 0 or max(float(a.abs().max()), float(b.abs().max())) == 0.0:
        return []
    # "zero" relative to each loss's own largest coefficient: a normaliser must not count
    on_a = a.abs() > tol * float(a.abs().max())
    on_b = b.abs() > tol * float(b.abs().max())
    both = on_a & on_b
    notes = []
    zero_a, zero_b = on_b & ~on_a, on_a & ~on_b
    one_sided = bool(zero_a.any()) or bool(zero_b.any())
    if one_sided:
        notes.append(
            f"c_t is zero in one loss only on {int(zero_a.sum())} token(s) (A zero) and "
            f"{int(zero_b.sum())} token(s) (B zero): a clip or mask rule differs (see the clip "
            "fractions side by side)"
        )
    if not bool(both.any()):
        return notes
    both_grid = torch.zeros_like(m)
    both_grid[m] = both
    q = b[both] / a[both]
    every = "on the tokens where both are non-zero" if one_sided else "on every token"
    k = is_constant(q)
    if k is not None and abs(k - 1.0) <= PATTERN_RTOL:  # a tiny gap: rounding or an epsilon
        eps = epsilon_note(batch, q, both_grid)
        return notes + (eps or _float32_hint(batch, coefficient_rel))
    named = aggregation_notes(batch, q, both_grid, pair)
    if named:
        if one_sided:
            named = [f"{named[0]} ({every})"]
        return notes + named
    if k is not None:
        notes.append(
            f"c_B/c_A = {k:.6g} {every}: the same surrogate with a different normaliser"
            f"{constant_factor(batch, k)}{_self_aggregation_hint(pair)}"
        )
        return notes
    eps = epsilon_note(batch, q, both_grid) or per_sequence_note(batch, q, both_grid)
    if eps:
        return notes + eps
    log_r = (logp - effective_old_logp(batch, logp))[m].double()[both]
    for power, meaning in ((1, "B carries an extra factor r"), (-1, "B lacks the factor r")):
        k = is_constant(q * torch.exp(-power * log_r))
        if k is not None and bool((log_r.abs() > 1e-12).any()):
            extra = "" if abs(k - 1.0) <= tol else f", times the constant {k:.6g}"
            notes.append(
                f"c_B/c_A = r_t^{power:+d} {every}{extra}: {meaning} = π_θ/π_old, an "
                "importance weight applied in one implementation and not the other"
            )
            return notes
    return notes + _float32_hint(batch, coefficient_rel)


def _self_aggregation_hint(pair: Pair) -> str:
    if pair.a_aggregates_itself == pair.b_aggregates_itself:
        return ""
    own = "A" if pair.a_aggregates_itself else "B"
    return f" ({own} aggregates itself; the other uses loss.aggregation = {pair.aggregation.mode})"


def _float32_hint(batch: Batch, coefficient_rel: float | None) -> list[str]:
    low, high = FLOAT32_GAP
    if batch.weight.dtype != torch.float64 or coefficient_rel is None:
        return []
    if not low < coefficient_rel <= high:
        return []
    return [
        f"a float64 gap of {coefficient_rel:.2g} with no pattern is float32 rounding: one side "
        "computes in float32 (OpenRLHF's KL casts to float32)"
    ]


@dataclass(frozen=True)
class ParityInputs:
    """What `build_parity` needs from an engine: the two losses and their gap."""

    a: ParityLoss
    b: ParityLoss
    gap: ParityGap


def materialized_inputs(
    batch: Batch,
    view: SoftmaxView,
    a: LossSpec,
    b: LossSpec,
    params: LossParams,
    agg: Aggregation,
) -> ParityInputs:
    """The inputs of losses ``a`` and ``b`` from their materialized closed-form gradients.

    With an entropy bonus the gradients include its non-c-form term, as the losses' own reports do.
    """
    ga = closed_form(batch, view, a, params, agg)
    gb = closed_form(batch, view, b, params, agg)
    gap = ParityGap(
        row_diff=float((ga.grad_weight.double() - gb.grad_weight.double()).norm(dim=1).max()),
        grad_logits_rel=rel_err(gb.grad_logits, ga.grad_logits),
    )
    return ParityInputs(_materialized(a, ga), _materialized(b, gb), gap)


def _materialized(spec: LossSpec, grads: LossGradients) -> ParityLoss:
    return ParityLoss(
        name=spec.name,
        loss=grads.loss,
        grad_norm=num(grads.grad_weight.double().norm()),
        rows=grads.grad_weight.double().norm(dim=1),
        coefficient=grads.coefficient,
        terms=grads.terms,
        metrics=terms_metrics(grads.terms, grads.agg_weights),
    )


def build_parity(
    batch: Batch, logp: Tensor, inputs: ParityInputs, agg: Aggregation, tolerance: float
) -> ParityReport:
    """The report from either engine's inputs; ``logp`` is [N, T] ℓ_t (0 at masked positions)."""
    a, b, gap = inputs.a, inputs.b, inputs.gap
    m = batch.mask
    ca, cb = a.coefficient, b.coefficient
    diff = torch.where(m, (ca - cb).abs(), 0.0).double()  # [N, T]
    scale = max(float(ca[m].abs().max()), float(cb[m].abs().max())) if bool(m.any()) else 0.0
    max_diff = float(diff.max()) if diff.numel() else 0.0
    coefficient_rel = num(max_diff / scale) if scale > 0.0 else num(max_diff)
    differing = int((diff > tolerance * scale).sum()) if scale > 0 else 0

    top = []
    n_idx, t_idx = torch.nonzero(diff > 0, as_tuple=True)
    order = torch.argsort(diff[n_idx, t_idx], descending=True)[:TOP]
    for k in order.tolist():
        n, t = int(n_idx[k]), int(t_idx[k])
        top.append(
            ParityPosition(
                sequence=n,
                position=t,
                token=int(batch.tokens[n, t]),
                coefficient_a=num(ca[n, t]),
                coefficient_b=num(cb[n, t]),
                abs_diff=num(diff[n, t]),
            )
        )

    side_a, side_b = _side(a, m), _side(b, m)
    ratio = None
    if side_a.grad_norm and side_b.grad_norm is not None:
        ratio = num(side_b.grad_norm / side_a.grad_norm)
    rows_a, rows_b = a.rows.double(), b.rows.double()
    row_scale = float(torch.maximum(rows_a, rows_b).max()) if rows_a.numel() else 0.0
    row_diff = gap.row_diff
    passed = coefficient_rel is not None and coefficient_rel <= tolerance

    notes = []
    if not passed:
        if ratio is not None:
            notes.append(
                f"‖∂L/∂W‖ of {b.name} is {ratio:.4g}× that of {a.name}; "
                f"{differing} of {int(m.sum())} tokens differ beyond the tolerance"
            )
        pair = Pair(
            aggregation=agg,
            a_aggregates_itself=a.terms.self_aggregated,
            b_aggregates_itself=b.terms.self_aggregated,
            rejected=_rejected(a, m) | _rejected(b, m),
        )
        notes += patterns(batch, logp, ca, cb, tolerance, pair, coefficient_rel)
    return ParityReport(
        a=side_a,
        b=side_b,
        coefficient_max_abs_diff=num(max_diff),
        coefficient_rel=coefficient_rel,
        differing_tokens=differing,
        top=top,
        grad_norm_ratio=ratio,
        loss_diff=num(b.loss - a.loss),
        grad_logits_rel=gap.grad_logits_rel,
        row_max_rel=num(row_diff / row_scale) if row_scale > 0 else num(row_diff),
        tolerance=tolerance,
        passed=passed,
        findings=notes,
    )
