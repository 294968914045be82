"""From per-token coefficients to logit and lm_head gradients: the closed form and its twin.

The identity everything rests on (losses.md §0): a loss that touches the logits of token t only
through ℓ_t = log π_θ(y_t) has

    ∂L/∂z_t = c_t·(e_{y_t} − π_t),     c_t = ∂L/∂ℓ_t = a_t·g_t,
    ∂L/∂W   = Σ_t (∂L/∂z_t) h_tᵀ   — row v:  Σ_{t: y_t = v} c_t h_t − Σ_t c_t π_{t,v} h_t.

`closed_form` evaluates that from the loss's own g_t, with the softmax computed once per batch
(`SoftmaxView`) and shared by every loss; its π is normalised by `gradlens.logits` (a float64
sum in a fixed order), so that the rows sum to zero within a bound that holds on every device.
`autograd_reference` differentiates the aggregated loss through log_softmax with torch.autograd,
as a trainer would; the agreement diagnostic compares the two. Both work on the M valid tokens
only, flattened to [M, ·].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gradlens.containers import Batch, LossTerms, TokenInputs, valid_index
from gradlens.logits import (
    Normaliser,
    compute_logits,
    log_probs,
    normaliser,
    softmax_dtype,
    token_logp,
)
from gradlens.losses import LossParams, LossSpec, aggregation_weights
from gradlens.losses.corrections import apply_corrections
from gradlens.summation import pairwise_sum


@dataclass(frozen=True)
class Aggregation:
    """Which aggregation mode, and its L_scale for ``seq_mean_token_sum_norm``."""

    mode: str = "token_mean"
    loss_scale_factor: float | None = None


@dataclass(frozen=True)
class SoftmaxView:
    """The logit path of the valid tokens, computed once and shared by all losses.

    Attributes:
        rows, cols: (n, t) of each valid token, M each (row-major order).
        hidden: [M, H] h_t in the operand dtype.
        tokens: [M] y_t.
        logits: [M, V] z_t in the softmax dtype.
        probs: [M, V] π_t = exp((z − m) − log S) (`gradlens.logits`).
        logp: [N, T] ℓ_t = log π_θ(y_t) by torch's log_softmax, as a trainer computes it
            (`gradlens.logits.token_logp`); 0 at masked positions.
        entropy: [M] H(π_t) = −Σ_v π log π, summed in float64 (`gradlens.summation`).
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


def softmax_view(batch: Batch) -> SoftmaxView:
    """One pass over the logits of the valid tokens."""
    rows, cols = valid_index(batch.mask)
    hidden = batch.hidden[rows, cols]  # [M, H]
    tokens = batch.tokens[rows, cols]  # [M]
    logits = compute_logits(hidden, batch.weight)  # [M, V]
    logp = torch.zeros(batch.mask.shape, dtype=logits.dtype, device=logits.device)  # [N, T]
    logp[rows, cols] = token_logp(logits, tokens)
    norm = normaliser(logits)
    log_pi = log_probs(logits, norm)  # [M, V]
    probs = log_pi.exp()
    entropy = (-pairwise_sum(probs * log_pi)).to(logits.dtype)  # [M]
    return SoftmaxView(rows, cols, hidden, tokens, logits, probs, logp, entropy, norm)


def effective_old_logp(batch: Batch, logp: Tensor) -> Tensor:
    """[N, T] ℓ_old, with ℓ itself (detached) at the batch's on-policy positions."""
    old = batch.old_logp.to(logp.dtype)
    if batch.on_policy is None:
        return old
    return torch.where(batch.on_policy, logp.detach(), old)


def token_inputs(batch: Batch, logp: Tensor) -> TokenInputs:
    """Loss inputs on the [N, T] grid, with zeros at masked positions (never inf or NaN there)."""
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
    )


@dataclass(frozen=True)
class LossGradients:
    """One loss's gradients on one batch.

    Attributes:
        loss: the aggregated scalar loss L.
        terms: the loss's per-token terms (g_t and its regions).
        weights: [N, T] aggregation weights a_t.
        coefficient: [N, T] c_t = ∂L/∂ℓ_t (0 at masked positions).
        grad_logits: [M, V] ∂L/∂z_t of the valid tokens.
        grad_weight: [V, H] ∂L/∂W.
        entropy_grad_logits: [M, V] the entropy bonus's part of ``grad_logits``, or None when
            ``entropy_coef`` is 0. It is not of the form c·(e_y − π).
        agg_weights: [N, T] the run's aggregation weights; they differ from ``weights`` (all 1)
            for a loss that aggregates itself. None: the same as ``weights``.
    """

    loss: float
    terms: LossTerms
    weights: Tensor
    coefficient: Tensor
    grad_logits: Tensor
    grad_weight: Tensor
    entropy_grad_logits: Tensor | None = None
    agg_weights: Tensor | None = None


def run_params(params: LossParams, agg: Aggregation) -> LossParams:
    """``params`` carrying the run's aggregation (read by losses that aggregate themselves)."""
    if (params.aggregation, params.loss_scale_factor) == (agg.mode, agg.loss_scale_factor):
        return params
    return replace(params, aggregation=agg.mode, loss_scale_factor=agg.loss_scale_factor)


def loss_terms(inputs: TokenInputs, spec: LossSpec, params: LossParams) -> LossTerms:
    """The loss's terms with the training–inference corrections of ``params`` applied."""
    return apply_corrections(spec.fn(inputs, params), inputs, params.corrections)


def loss_weights(
    mask: Tensor, terms: LossTerms, agg: Aggregation, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(weights of the loss's terms, the run's aggregation weights), [N, T] each."""
    agg_weights = aggregation_weights(mask, agg.mode, agg.loss_scale_factor, dtype)
    return (mask.to(dtype) if terms.self_aggregated else agg_weights), agg_weights


def closed_form(
    batch: Batch, view: SoftmaxView, spec: LossSpec, params: LossParams, agg: Aggregation
) -> LossGradients:
    """Gradients from the master identity: no graph over the logits.

    With ``params.entropy_coef`` = c_H ≠ 0 the bonus −c_H·Σ_t a_t H_t is added: its logit
    gradient a_t·c_H·π_t,i·(log π_t,i + H_t) (docs/losses.md §2.11) is the one term not of the form
    c·(e_y − π); it is zero-sum, and the coefficient c_t (∂L/∂ℓ_t) does not include it.
    """
    params = run_params(params, agg)
    inputs = token_inputs(batch, view.logp)
    terms = loss_terms(inputs, spec, params)
    weights, agg_weights = loss_weights(batch.mask, terms, agg, view.logits.dtype)
    coefficient = weights * terms.coefficient  # [N, T]
    c = coefficient[view.rows, view.cols]  # [M]
    grad_logits = -c[:, None] * view.probs  # [M, V]
    grad_logits.scatter_add_(-1, view.tokens[:, None], c[:, None])  # + c·e_y
    loss = float((weights * terms.per_token).sum())
    entropy_grad = None
    if params.entropy_coef != 0.0:
        a = agg_weights[view.rows, view.cols]  # [M]
        log_pi = log_probs(view.logits, view.normaliser)  # [M, V], as ``view.probs``'s
        h = view.entropy[:, None]  # [M, 1]
        entropy_grad = (params.entropy_coef * a)[:, None] * view.probs * (log_pi + h)
        grad_logits = grad_logits + entropy_grad
        loss -= params.entropy_coef * float((a * view.entropy).sum())
    grad_weight = grad_logits.T @ view.hidden.to(grad_logits.dtype)  # [V, H]
    return LossGradients(
        loss, terms, weights, coefficient, grad_logits, grad_weight, entropy_grad, agg_weights
    )


@dataclass(frozen=True)
class ReferenceGradients:
    """The same quantities by torch.autograd (the slow twin of `closed_form`)."""

    loss: float
    coefficient: Tensor  # [N, T] ∂L/∂ℓ_t
    grad_logits: Tensor  # [M, V]
    grad_weight: Tensor  # [V, H], in the operand dtype


def autograd_reference(
    batch: Batch, spec: LossSpec, params: LossParams, agg: Aggregation
) -> ReferenceGradients:
    """Differentiate L = Σ a_t·ℓ_t(loss) through log_softmax(W h) with autograd."""
    rows, cols = valid_index(batch.mask)
    weight = batch.weight.detach().clone().requires_grad_(True)
    hidden = batch.hidden[rows, cols].detach()  # [M, H]
    logits = (hidden @ weight.T).to(softmax_dtype(weight.dtype))  # [M, V]
    logits.retain_grad()
    sampled = torch.log_softmax(logits, dim=-1).gather(-1, batch.tokens[rows, cols][:, None])
    logp = torch.zeros(batch.mask.shape, dtype=logits.dtype, device=logits.device)
    logp = logp.index_put((rows, cols), sampled.squeeze(-1))  # [N, T], differentiable
    logp.retain_grad()
    params = run_params(params, agg)
    terms = loss_terms(token_inputs(batch, logp), spec, params)
    weights, agg_weights = loss_weights(batch.mask, terms, agg, logits.dtype)
    loss = (weights * terms.per_token).sum()
    if params.entropy_coef != 0.0:  # the bonus from the very logits being differentiated
        log_probs = torch.log_softmax(logits, dim=-1)  # [M, V]
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # [M]
        loss = loss - params.entropy_coef * (agg_weights[rows, cols] * entropy).sum()
    loss.backward()
    assert logits.grad is not None and logp.grad is not None and weight.grad is not None
    return ReferenceGradients(float(loss.detach()), logp.grad, logits.grad, weight.grad)
