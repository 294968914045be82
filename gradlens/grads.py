"""From per-token coefficients to logit and lm_head gradients: the closed form and its twin.

The identity everything rests on (losses.md §0): a loss that touches the logits of token t only
through ℓ_t = log π_θ(y_t) has

    ∂L/∂z_t = c_t·(e_{y_t} − π_t),     c_t = ∂L/∂ℓ_t = a_t·g_t,
    ∂L/∂W   = Σ_t (∂L/∂z_t) h_tᵀ   — row v:  Σ_{t: y_t = v} c_t h_t − Σ_t c_t π_{t,v} h_t.

`closed_form` evaluates that from the loss's own g_t, with the softmax computed once per batch
(`SoftmaxView`) and shared by every loss. `autograd_reference` differentiates the aggregated
loss through log_softmax with torch.autograd, as a trainer would; the agreement diagnostic
compares the two. Both work on the M valid tokens only, flattened to [M, ·].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch, LossTerms, TokenInputs, valid_index
from gradlens.logits import compute_logits, softmax_dtype
from gradlens.losses import LossParams, LossSpec, aggregation_weights


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
        probs: [M, V] π_t.
        logp: [N, T] ℓ_t = log π_θ(y_t), 0 at masked positions.
        entropy: [M] H(π_t).
    """

    rows: Tensor
    cols: Tensor
    hidden: Tensor
    tokens: Tensor
    logits: Tensor
    probs: Tensor
    logp: Tensor
    entropy: Tensor

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
    log_probs = torch.log_softmax(logits, dim=-1)  # [M, V]
    probs = log_probs.exp()
    logp = torch.zeros(batch.mask.shape, dtype=logits.dtype, device=logits.device)  # [N, T]
    logp[rows, cols] = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(probs * log_probs).sum(-1)  # [M]
    return SoftmaxView(rows, cols, hidden, tokens, logits, probs, logp, entropy)


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
    """

    loss: float
    terms: LossTerms
    weights: Tensor
    coefficient: Tensor
    grad_logits: Tensor
    grad_weight: Tensor


def closed_form(
    batch: Batch, view: SoftmaxView, spec: LossSpec, params: LossParams, agg: Aggregation
) -> LossGradients:
    """Gradients from the master identity: no graph over the logits."""
    inputs = token_inputs(batch, view.logp)
    terms = spec.fn(inputs, params)
    weights = aggregation_weights(batch.mask, agg.mode, agg.loss_scale_factor, view.logits.dtype)
    coefficient = weights * terms.coefficient  # [N, T]
    c = coefficient[view.rows, view.cols]  # [M]
    grad_logits = -c[:, None] * view.probs  # [M, V]
    grad_logits.scatter_add_(-1, view.tokens[:, None], c[:, None])  # + c·e_y
    grad_weight = grad_logits.T @ view.hidden.to(grad_logits.dtype)  # [V, H]
    loss = float((weights * terms.per_token).sum())
    return LossGradients(loss, terms, weights, coefficient, grad_logits, grad_weight)


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
    terms = spec.fn(token_inputs(batch, logp), params)
    weights = aggregation_weights(batch.mask, agg.mode, agg.loss_scale_factor, logits.dtype)
    loss = (weights * terms.per_token).sum()
    loss.backward()
    assert logits.grad is not None and logp.grad is not None and weight.grad is not None
    return ReferenceGradients(float(loss.detach()), logp.grad, logits.grad, weight.grad)
