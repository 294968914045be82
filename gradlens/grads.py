"""From per-token log-probs to the loss, its coefficients, and the logit and lm_head gradients.

The identity everything rests on (losses.md §0): a loss that touches the logits of token t only
through ℓ_t = log π_θ(y_t) has

    ∂L/∂z_t = c_t·(e_{y_t} − π_t),     c_t = ∂L/∂ℓ_t = a_t·g_t,
    ∂L/∂W   = Σ_t (∂L/∂z_t) h_tᵀ   — row v:  Σ_{t: y_t = v} c_t h_t − Σ_t c_t π_{t,v} h_t,

with g_t the loss's per-token gradient (`LossTerms.per_token_grad`) and a_t the aggregation
weight. What the run minimises for one loss is written once, in `objective`:

    terms   = the loss's per-token terms with the run's training–inference corrections and
              top-entropy token selection S_t (1 when it is off)
    weights = a_t (the aggregation's weights, on the mask without the tokens a renormalising
              correction rejects (`aggregation_mask`); 1 for a loss that aggregates itself)
    L       = Σ_t weights_t·per_token_t  −  c_H·Σ_t a_t·S_t·H_t  (entropy bonus, when c_H ≠ 0)
                                         +  λ·Σ_t a_t·D_t         (distillation, ``loss.distill``)
    c_t     = weights_t·g_t

Every path calls it: the closed form (`closed_form`, no graph over the logits, the softmax
computed once by `softmax_view` and shared by every loss), its autograd twin
(`autograd_reference`, as a trainer differentiates), the streamed engine's coefficients, the
whole-model gradients and the staleness steps of a real checkpoint (through `policy_pass`, the
differentiable twin of `softmax_view`). The entropy bonus's logit gradient
a_t·S_t·c_H·π_t,i·(log π_t,i + H_t) and the distillation term's λ·a_t·(u_t − π_t·Σu_t)
(`gradlens.losses.distill`) are the terms not of the form c·(e_y − π); both are zero-sum, and c_t
includes neither. The distillation term is weighted by a_t alone: the top-entropy selection S_t
applies to the policy gradient and the entropy bonus only.

The π that `softmax_view` gives (and `closed_form` builds its gradients from) is normalised by
`gradlens.logits` (a float64 sum in a fixed order), so that the rows of ∂L/∂z sum to zero within
a bound that holds on every device; ℓ_t itself is torch's log_softmax, as a trainer computes it.

Replaying the rollout's sampling support (``loss.sampling_support: kept``, `replay`): when the
rollout sampled from μ restricted to a kept set K_t (top-p, top-k) and renormalised, the losses
can use π̃_t = π_t·1[K_t]/S_t, S_t = Σ_{v∈K_t} π_t,v, in place of π_t:

    ℓ̃_t = log π̃_t(y_t) = z_y − logsumexp_{v∈K_t} z_v = ℓ_t − log S_t,
    ∂L/∂z_t,v = c_t·(1[v = y_t] − π̃_t,v)   for v ∈ K_t,   exactly 0 for v ∉ K_t,

still summing to zero over v. Every logit path does it the same way: the logits outside K_t
set to −inf (`gradlens.logits.restrict_logits`) before the softmax. The stored log-probs of
π_old, μ and π_ref are shifted by their own log kept mass (`KeptSets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gradlens.containers import Batch, LossTerms, TokenInputs, valid_index
from gradlens.errors import GradlensError
from gradlens.logits import (
    Normaliser,
    compute_logits,
    kept_entries,
    log_probs,
    normaliser,
    probabilities,
    restrict_logits,
    softmax_dtype,
)
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.losses.corrections import apply_corrections, kept_mask
from gradlens.losses.distill import (
    TeacherTokens,
    divergence_grad,
    teacher_tokens,
    token_value,
)
from gradlens.losses.token_selection import apply_token_selection, bonus_weights, top_entropy_mask
from gradlens.summation import pairwise_sum


@dataclass(frozen=True)
class PolicyPass:
    """The logit path of the valid tokens: log π of the sampled tokens and the full log π_t.

    Differentiable when the hidden states or the weight are. Attributes:
        rows, cols: (n, t) of each valid token, M each (row-major order).
        hidden: [M, H] h_t in the operand dtype.
        tokens: [M] y_t.
        logits: [M, V] z_t in the softmax dtype (−inf outside K_t when the support is replayed);
            None when not kept (a backward through log_softmax needs only its output).
        log_probs: [M, V] log π_t (log π̃_t, −inf outside K_t, when replayed).
        logp: [N, T] ℓ_t = log π(y_t) at the valid tokens, 0 elsewhere.
    """

    rows: Tensor
    cols: Tensor
    hidden: Tensor
    tokens: Tensor
    logits: Tensor | None
    log_probs: Tensor
    logp: Tensor

    def entropy(self) -> Tensor:
        """[N, T] H(π_t) at the valid tokens, 0 elsewhere (differentiable as ``log_probs``)."""
        values = entropy_of(self.log_probs)  # [M]
        return on_grid(values, self.rows, self.cols, self.logp.shape)


def finite_log(log_probs: Tensor) -> Tensor:
    """log π with 0 where π = 0 (outside a replayed K_t), so that π·log π is 0 there and no
    NaN reaches a gradient."""
    return log_probs.masked_fill(log_probs == -torch.inf, 0.0)


def entropy_of(log_probs: Tensor) -> Tensor:
    """[M, V] log π → [M] H(π) = −Σ_v π_v log π_v (0·log 0 = 0), differentiable."""
    return -(log_probs.exp() * finite_log(log_probs)).sum(-1)


def on_grid(values: Tensor, rows: Tensor, cols: Tensor, shape: torch.Size) -> Tensor:
    """[M] values of the valid tokens placed on the [N, T] grid, 0 elsewhere (differentiable)."""
    grid = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return grid.index_put((rows, cols), values)


def reads_entropy(specs: Iterable[LossSpec], params: LossParams) -> bool:
    """Whether `objective` needs H_t for any of ``specs``: the entropy bonus, the top-entropy
    token selection, or a loss that reads it (``needs`` has ``entropy``)."""
    selection = params.top_entropy_quantile < 1.0
    return params.entropy_coef != 0.0 or selection or any("entropy" in s.needs for s in specs)


def policy_entropy(p: PolicyPass, specs: Iterable[LossSpec], params: LossParams) -> Tensor | None:
    """[N, T] H_t for `objective` on the path ``p``: differentiable with the entropy bonus,
    detached when only the losses or the selection read it, None when nothing does."""
    if not reads_entropy(specs, params):
        return None
    entropy = p.entropy()
    return entropy if params.entropy_coef != 0.0 else entropy.detach()


def policy_pass(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    kept_ids: Tensor | None = None,
    keep_logits: bool = True,
    logits_of: Callable[[Tensor, Tensor], Tensor] = compute_logits,
) -> PolicyPass:
    """log π(y_t) over the valid tokens from the final hidden states [N, T, H] and W [V, H];
    with ``kept_ids`` [N, T, K] (`KeptSets.ids`) log π̃(y_t) on the replayed support. Without
    ``keep_logits`` the [M, V] logits are freed once the log-softmax is formed. ``logits_of``:
    the [M, H] × [V, H] → [M, V] product (`compute_logits`, or one whose backward runs in
    another dtype: `gradlens.sources.lowered_product`)."""
    rows, cols = valid_index(mask)
    h = hidden[rows, cols]  # [M, H]
    y = tokens[rows, cols]  # [M]
    logits = logits_of(h, weight)  # [M, V]
    if kept_ids is not None:
        logits = restrict_logits(logits, kept_entries(kept_ids[rows, cols], 0, logits.shape[-1]))
    log_probs = torch.log_softmax(logits, dim=-1)  # [M, V]
    sampled = log_probs.gather(-1, y[:, None]).squeeze(-1)  # [M]
    logp = on_grid(sampled, rows, cols, mask.shape)  # [N, T]
    return PolicyPass(rows, cols, h, y, logits if keep_logits else None, log_probs, logp)


@dataclass(frozen=True)
class SoftmaxView:
    """`policy_pass` without a graph, with π_t: computed once per batch, shared by all losses.

    Attributes:
        rows, cols, hidden, tokens, logits, logp: as in `PolicyPass`.
        probs: [M, V] π_t = exp((z − m) − log S) (`gradlens.logits`); not exp(log_softmax),
            whose sum depends on the kernel.
        entropy: [M] H(π_t) = −Σ_v π log π of those π, summed in float64
            (`gradlens.summation`).
        normaliser: the per-token m and S of ``probs``.
    """

    rows: Tensor
    cols: Tensor
    hidden: Tensor
    tokens: Tensor
    logits: Tensor
    probs: Tensor
    logp: Tensor
    entropy: Tensor
    normaliser: Normaliser

    @property
    def sampled_probs(self) -> Tensor:
        """[M] π_t(y_t)."""
        return self.probs.gather(-1, self.tokens[:, None]).squeeze(-1)

    def entropy_grid(self) -> Tensor:
        """[N, T] H(π_t), 0 at masked positions."""
        return on_grid(self.entropy, self.rows, self.cols, self.logp.shape)


def whole_weight(batch: Batch, what: str) -> None:
    """Raise when ``batch`` holds only some rows of W (a tensor-parallel rank's): ``what`` needs
    every row."""
    rows = batch.weight_rows
    if rows is not None and (rows.start, rows.stop) != (0, rows.vocab):
        raise GradlensError(
            f"{what} needs the whole lm_head, but this batch holds rows [{rows.start}, "
            f"{rows.stop}) of {rows.vocab} (one tensor-parallel rank's); only the streamed "
            "engine runs under tensor_parallel"
        )


def softmax_view(batch: Batch) -> SoftmaxView:
    """One pass over the logits of the valid tokens: ``logits`` and ``logp`` by the same
    operations as `policy_pass` (bit-identical for the same hidden states and weight), π and H
    from gradlens's own normaliser."""
    whole_weight(batch, "the materialized softmax")
    with torch.no_grad():
        p = policy_pass(batch.hidden, batch.weight, batch.tokens, batch.mask, replayed_ids(batch))
        rows, cols, hidden, tokens, logits, logp = (
            p.rows,
            p.cols,
            p.hidden,
            p.tokens,
            p.logits,
            p.logp,
        )
        del p  # its [M, V] log_softmax: ℓ_t is all that is kept of it
        assert logits is not None
        norm = normaliser(logits)  # of the restricted logits on a replayed support
        log_pi = log_probs(logits, norm)  # [M, V], −inf outside a replayed K_t
        probs = probabilities(log_pi)  # floored as the streamed engine's (gradlens.logits)
        probs.masked_fill_(torch.isneginf(log_pi), 0.0)  # exactly 0 outside a replayed K_t
        entropy = (-pairwise_sum(probs * finite_log(log_pi))).to(logits.dtype)  # [M]
    return SoftmaxView(rows, cols, hidden, tokens, logits, probs, logp, entropy, norm)


def replayed_ids(batch: Batch) -> Tensor | None:
    """[N, T, K] the kept ids every logit path restricts π to: those of a replayed batch."""
    if not batch.replayed or batch.kept is None:
        return None
    return batch.kept.ids


def replay(batch: Batch) -> Batch:
    """``batch`` with its sampling support replayed (module docstring): the logit paths use π̃,
    and ℓ_old, ℓ_rollout and ℓ_ref become log q̃(y) = log q(y) − log S^q_t.

    Errors when the batch has no kept sets, or a sampled token lies outside its K_t (π̃ = 0
    there, and the sampler could not have drawn it)."""
    kept = batch.kept
    if kept is None:
        raise GradlensError(
            "loss.sampling_support: 'kept' replays the rollout's top-p/top-k kept sets, and this "
            f"batch ({batch.source or 'its source'}) records none; use the model source with "
            "source.top_p < 1 or source.top_k > 0, or a batch file with kept_ids, or set "
            "sampling_support: full"
        )
    m = batch.mask
    inside = (kept.ids == batch.tokens[..., None]).any(-1)  # [N, T]
    outside = int((m & ~inside).sum())
    if outside:
        i, t = (int(x) for x in (m & ~inside).nonzero()[0])
        token, ids = (batch.origin.name(field, (i, t)) for field in ("tokens", "kept_ids"))
        raise GradlensError(
            f"kept sets ({kept.rule}): {outside} sampled token(s) lie outside their kept set "
            f"K_t, which the sampler could not have drawn (the first: {token} = "
            f"{int(batch.tokens[i, t])}, not in {ids}); the kept ids do not belong to this "
            "batch's tokens"
        )

    def shifted(logp: Tensor | None, log_mass: Tensor | None) -> Tensor | None:
        if logp is None or log_mass is None:
            return logp
        return torch.where(m, logp - log_mass.to(logp.dtype), logp)

    ref_mass = kept.ref_log_mass if kept.ref_log_mass is not None else kept.old_log_mass
    old = batch.old_logp
    if kept.old_log_mass is not None:
        old = torch.where(m, old - kept.old_log_mass.to(old.dtype), old)
    return replace(
        batch,
        old_logp=old,
        rollout_logp=shifted(batch.rollout_logp, kept.rollout_log_mass),
        ref_logp=shifted(batch.ref_logp, ref_mass),
        replayed=True,
    )


def effective_old_logp(batch: Batch, logp: Tensor) -> Tensor:
    """[N, T] ℓ_old, with ℓ itself (detached) at the batch's on-policy positions."""
    old = batch.old_logp.to(logp.dtype)
    if batch.on_policy is None:
        return old
    return torch.where(batch.on_policy, logp.detach(), old)


def token_inputs(batch: Batch, logp: Tensor, entropy: Tensor | None = None) -> TokenInputs:
    """Loss inputs on the [N, T] grid, with zeros at masked positions (never inf or NaN there).

    ``entropy`` is [N, T] H(π_θ,t) (detached here), or None where the caller has none.
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    m = batch.mask

    def clean(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(m, x.to(logp.dtype), zero)

    return TokenInputs(
        logp=torch.where(m, logp, zero),
        old_logp=clean(effective_old_logp(batch, logp)),  # type: ignore[arg-type]
        advantages=clean(batch.advantages),  # type: ignore[arg-type]
        mask=m,
        rollout_logp=clean(batch.rollout_logp),
        ref_logp=clean(batch.ref_logp),
        teacher_logp=None
        if batch.teacher is None or batch.teacher.sampled_logp is None
        else clean(batch.teacher.sampled_logp),
        entropy=None if entropy is None else clean(entropy.detach()),
        groups=batch.groups,
    )


@dataclass(frozen=True)
class Objective:
    """One loss as the run minimises it, on one batch.

    Attributes:
        terms: the loss's per-token terms, the run's corrections and token selection applied.
        weights: [N, T] the weights applied to ``terms``: the aggregation weights a_t, or 1 for
            a loss that aggregates itself.
        agg_weights: [N, T] the run's aggregation weights (the per-token metrics are aggregated
            with them, whoever aggregates the loss).
        bonus_weights: [N, T] the entropy bonus's weights a_t·S_t: ``agg_weights`` times the
            top-entropy selection S_t (`gradlens.losses.token_selection`; a_t when it is off).
        coefficient: [N, T] c_t = ∂L/∂ℓ_t = weights·g_t, detached (0 at masked positions).
        loss: the scalar L, differentiable wherever ``logp`` (and the entropy) are.
        selection: [N, T] bool the top-entropy selection S_t it applied (None: off). A
            reference that differentiates the same loss takes it as given (``objective``'s
            ``selection``): S_t is a 0/1 step of H_t, and two computations of H_t that round
            differently can put a token on either side of the threshold (completions of one
            prompt tie exactly on their first token).
    """

    terms: LossTerms
    weights: Tensor
    agg_weights: Tensor
    bonus_weights: Tensor
    coefficient: Tensor
    loss: Tensor
    selection: Tensor | None = None


def entropy_bonus(bonus_weights: Tensor, entropy: Tensor, entropy_coef: float) -> Tensor:
    """The bonus's part of the loss, −c_H·Σ_t a_t·S_t·H_t (``bonus_weights`` a_t·S_t [N, T]);
    ``entropy`` [N, T], 0 at masked tokens."""
    return -entropy_coef * (bonus_weights * entropy.to(bonus_weights.dtype)).sum()


def distill_term(agg_weights: Tensor, divergence: Tensor, coef: float) -> Tensor:
    """The distillation term's part of the loss, λ·Σ_t a_t·D_t; ``divergence`` [N, T] D_t,
    0 at masked tokens."""
    return coef * (agg_weights * divergence.to(agg_weights.dtype)).sum()


def distill_teacher(batch: Batch, params: LossParams, rows: Tensor, cols: Tensor) -> TeacherTokens:
    """The batch's teacher at the valid tokens in the form ``loss.distill`` asks for."""
    assert params.distill is not None
    if batch.replayed:
        raise GradlensError(
            "loss.distill runs on the full vocabulary; with loss.sampling_support: 'kept' the "
            "student is restricted to its kept sets (set sampling_support: full)"
        )
    whole_weight(batch, "loss.distill")
    dtype = softmax_dtype(batch.weight.dtype)
    return teacher_tokens(batch.teacher, rows, cols, params.distill, batch.vocab_size, dtype)


def aggregation_mask(inputs: TokenInputs, params: LossParams) -> Tensor:
    """[N, T] the mask the aggregation weights are computed from: the batch's, without the
    tokens that a correction with ``renormalize`` rejects (verl's rejection sampling). In
    bypass mode the rejection reads sg[π_θ]/μ, so it moves with π_θ (detached)."""
    return kept_mask(inputs, params.corrections, params.bypass_mode)


def bypass(inputs: TokenInputs, params: LossParams) -> TokenInputs:
    """``inputs`` with π_old := μ in verl's bypass mode (``params.bypass_mode``), else as is."""
    if not params.bypass_mode:
        return inputs
    if inputs.rollout_logp is None:
        raise GradlensError(
            "loss.bypass_mode takes the rollout log-probs μ as π_old, and this batch has none: "
            "set source.rollout_drift (synthetic source) or rollout_prob / rollout_logp on the "
            "positions (literal source)"
        )
    return dataclasses.replace(inputs, old_logp=inputs.rollout_logp)


def objective(
    batch: Batch,
    logp: Tensor,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    entropy: Tensor | None = None,
    divergence: Tensor | None = None,
    selection: Tensor | None = None,
) -> Objective:
    """The loss ``spec`` at the log-probs ``logp`` [N, T] (see the module docstring).

    ``entropy`` [N, T] H(π_t): the losses and the top-entropy selection read it (detached), and
    it adds the entropy bonus when ``params.entropy_coef`` ≠ 0; without it ``loss`` is the
    policy part only, and a loss or selection that needs H_t raises a `GradlensError`.
    ``divergence`` [N, T] D_t adds the distillation term when ``params.distill`` is set (the
    streamed engine adds it from its own per-token D_t with `distill_term`).
    ``selection`` [N, T] bool: the top-entropy selection S_t, given (another computation's
    `Objective.selection`); None: from ``entropy``.
    """
    inputs = bypass(token_inputs(batch, logp, entropy), params)
    terms = apply_corrections(
        spec.terms(inputs, params, aggregation), inputs, params.corrections, params.bypass_mode
    )
    keep = (  # S_t, None when off
        selection
        if selection is not None
        else top_entropy_mask(inputs, params.top_entropy_quantile)
    )
    terms = apply_token_selection(terms, inputs, keep)
    agg_weights = aggregation.weights(aggregation_mask(inputs, params), logp.dtype, batch.groups)
    weights = batch.mask.to(logp.dtype) if terms.self_aggregated else agg_weights
    loss = (weights * terms.per_token).sum()
    bonus = bonus_weights(agg_weights, keep)
    if entropy is not None and params.entropy_coef != 0.0:
        loss = loss + entropy_bonus(bonus, entropy, params.entropy_coef)
    if divergence is not None and params.distill is not None:
        loss = loss + distill_term(agg_weights, divergence, params.distill.coef)
    coefficient = weights * terms.per_token_grad  # [N, T]
    return Objective(terms, weights, agg_weights, bonus, coefficient, loss, keep)


@dataclass(frozen=True)
class LossGradients:
    """One loss's closed-form gradients on one batch.

    Attributes:
        objective: the loss, its terms, weights and coefficients c_t.
        loss: the aggregated scalar loss L (the entropy bonus included).
        grad_logits: [M, V] ∂L/∂z_t of the valid tokens.
        grad_weight: [V, H] ∂L/∂W.
        entropy_grad_logits: [M, V] the entropy bonus's part of ``grad_logits``, or None when
            ``entropy_coef`` is 0. It is not of the form c·(e_y − π).
        distill_grad_logits: [M, V] the distillation term's part of ``grad_logits``, or None
            without ``loss.distill``; not of the form c·(e_y − π) either.
        distill_scale: [M] λ·a_t·2Σ_v|u_tv|, the gross size of that part's cancelling terms.
    """

    objective: Objective
    loss: float
    grad_logits: Tensor
    grad_weight: Tensor
    entropy_grad_logits: Tensor | None = None
    distill_grad_logits: Tensor | None = None
    distill_scale: Tensor | None = None

    @property
    def terms(self) -> LossTerms:
        return self.objective.terms

    @property
    def weights(self) -> Tensor:
        return self.objective.weights

    @property
    def agg_weights(self) -> Tensor:
        return self.objective.agg_weights

    @property
    def bonus_weights(self) -> Tensor:
        return self.objective.bonus_weights

    @property
    def coefficient(self) -> Tensor:
        return self.objective.coefficient


def closed_form(
    batch: Batch,
    view: SoftmaxView,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
) -> LossGradients:
    """Gradients from the master identity: no graph over the logits."""
    divergence = dgrad = dscale = None
    if params.distill is not None:
        teacher = distill_teacher(batch, params, view.rows, view.cols)
        student = log_probs(view.logits, view.normaliser)  # [M, V] log π, as ``view.probs``'s
        value, dgrad, dscale = divergence_grad(student, teacher, params.distill)
        divergence = on_grid(value, view.rows, view.cols, batch.mask.shape)
    obj = objective(batch, view.logp, spec, params, aggregation, view.entropy_grid(), divergence)
    c = obj.coefficient[view.rows, view.cols]  # [M]
    grad_logits = -c[:, None] * view.probs  # [M, V]
    grad_logits.scatter_add_(-1, view.tokens[:, None], c[:, None])  # + c·e_y
    entropy_grad = None
    if params.entropy_coef != 0.0:
        a = obj.bonus_weights[view.rows, view.cols]  # [M] a_t·S_t
        log_pi = finite_log(log_probs(view.logits, view.normaliser))  # [M, V], as ``view.probs``'s
        h = view.entropy[:, None]  # [M, 1]
        entropy_grad = (params.entropy_coef * a)[:, None] * view.probs * (log_pi + h)
        grad_logits = grad_logits + entropy_grad
    distill_grad = distill_scale = None
    if params.distill is not None and dgrad is not None and dscale is not None:
        a = params.distill.coef * obj.agg_weights[view.rows, view.cols]  # [M]
        distill_grad = a[:, None].to(dgrad.dtype) * dgrad
        distill_scale = a.abs() * dscale
        grad_logits = grad_logits + distill_grad
    grad_weight = grad_logits.T @ view.hidden.to(grad_logits.dtype)  # [V, H]
    return LossGradients(
        obj, float(obj.loss), grad_logits, grad_weight, entropy_grad, distill_grad, distill_scale
    )


@dataclass(frozen=True)
class ReferenceGradients:
    """The same quantities by torch.autograd (the slow twin of `closed_form`)."""

    loss: float
    coefficient: Tensor  # [N, T] ∂L/∂ℓ_t
    grad_logits: Tensor  # [M, V]
    grad_weight: Tensor  # [V, H], in the operand dtype


def autograd_reference(
    batch: Batch,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    selection: Tensor | None = None,
) -> ReferenceGradients:
    """Differentiate the objective through log_softmax(W h) with autograd, as a trainer does;
    ``selection``: the closed form's top-entropy selection S_t, taken as given
    (`Objective.selection`)."""
    whole_weight(batch, "the autograd reference")
    weight = batch.weight.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        p = policy_pass(
            batch.hidden.detach(), weight, batch.tokens, batch.mask, replayed_ids(batch)
        )
        assert p.logits is not None
        p.logits.retain_grad()
        p.logp.retain_grad()
        entropy = policy_entropy(p, [spec], params)
        divergence = None
        if params.distill is not None:
            teacher = distill_teacher(batch, params, p.rows, p.cols)
            values = token_value(p.log_probs, teacher, params.distill)  # [M]
            divergence = on_grid(values, p.rows, p.cols, batch.mask.shape)
        loss = objective(
            batch, p.logp, spec, params, aggregation, entropy, divergence, selection
        ).loss
        loss.backward()
    assert p.logits.grad is not None and p.logp.grad is not None and weight.grad is not None
    return ReferenceGradients(float(loss.detach()), p.logp.grad, p.logits.grad, weight.grad)
