"""Where a non-finite gradient comes from: the first NaN or inf along the computation.

A loss's gradient ∂L/∂z_t = c_t·(e_y − π_t), ∂L/∂W = Σ_t (∂L/∂z_t) h_tᵀ is computed from

    the inputs A_t, ℓ_old, ℓ_rollout, ℓ_ref (at the positions in the loss), h_t and W
    → the logits z_t = W h_t → ℓ_t = log π_θ(y_t)
    → the loss's per-token terms and g_t = ∂(per-token loss)/∂ℓ_t (with the corrections)
    → the aggregation weights a_t → c_t = a_t·g_t → the sums over tokens and vocabulary.

`trace` walks that chain in this order and names the first stage with a non-finite value: the
tensor, and the (sequence, position) of its first such entry in row-major order, or the loss
term that produced it. Only when every input is finite and ℓ_t − ℓ_old is finite but
r = exp(ℓ_t − ℓ_old) is not does it blame the ratio. When everything up to c_t is finite, the
non-finite entries arose in the sums themselves (an overflow of the accumulation dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import Batch
from gradlens.grads import Objective, effective_old_logp
from gradlens.logits import compute_logits
from gradlens.validation import describe, find, non_finite

INPUTS = ("advantages", "old_logp", "rollout_logp", "ref_logp")


def _at(index: tuple[int, ...]) -> str:
    return f"sequence {index[0]}, position {index[1]}"


def _dtype(x: Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _input(batch: Batch, name: str, index: tuple[int, ...], value: float, count: int) -> str:
    computed = " (computed by the model)" if name in batch.origin.computed else ""
    more = f" and {count - 1} more" if count > 1 else ""
    return f"{batch.origin.name(name, index)}{computed} is {describe(value)}{more}"


def trace(batch: Batch, logp: Tensor, obj: Objective, loss: str) -> str:
    """Why loss ``loss``'s gradient has non-finite entries, in words (see the module text).

    ``logp`` [N, T] is ℓ_t as the engine computed it; ``obj`` the loss's objective on it.
    """
    mask = batch.mask
    for name in INPUTS:
        x = getattr(batch, name)
        if x is None:
            continue
        valid = mask
        if name == "old_logp" and batch.on_policy is not None:
            valid = mask & ~batch.on_policy  # there ℓ_old is ℓ itself
        found = find(x, non_finite, valid)
        if found is not None:
            return "the input " + _input(batch, name, found.index, found.value, found.count)
    for name, valid_hidden in (("hidden", mask), ("weight", None)):
        found = find(getattr(batch, name), non_finite, valid_hidden)
        if found is not None:
            return "the input " + _input(batch, name, found.index, found.value, found.count)
    found = find(logp, non_finite, mask)
    if found is not None:
        n, t = found.index
        z = compute_logits(batch.hidden[n, t], batch.weight)  # [V]: this position's logits
        bad_z = find(z, non_finite)
        if bad_z is not None:
            return (
                f"the logits z = W·h at {_at(found.index)} are not finite in {_dtype(z)} "
                f"(z[{bad_z.index[0]}] = {describe(bad_z.value)}, from finite hidden states and "
                "lm_head weight whose product overflows)"
            )
        return (
            f"ℓ = log π_θ(y) at {_at(found.index)} is {describe(found.value)} although its "
            f"logits are finite ({found.count} such position(s))"
        )
    terms = obj.terms
    if terms.self_aggregated and not bool(torch.isfinite(obj.loss.detach())):
        return (
            f"the loss {loss!r} returned {describe(float(obj.loss))} from finite inputs "
            "(its value, and so its gradient, is not a number)"
        )
    per_token = find(terms.per_token.detach(), non_finite, mask)
    grad = find(terms.per_token_grad, non_finite, mask)
    candidates = [f for f in (per_token, grad) if f is not None]
    first = min(candidates, key=lambda f: f.index) if candidates else None
    if first is not None:
        n, t = first.index
        old = effective_old_logp(batch, logp)
        log_r = logp[n, t] - old[n, t]
        if bool(torch.isfinite(log_r)) and not bool(torch.isfinite(torch.exp(log_r))):
            return (
                f"the log-ratio log(π_θ/π_old) at {_at(first.index)} is {float(log_r):.4g}, so "
                f"r = e^that overflows {_dtype(logp)}, and {loss!r}'s per-token gradient g_t "
                "with it"
            )
        what = (
            "per-token gradient g_t"
            if grad is not None and grad.index == first.index
            else ("per-token loss")
        )
        value = first.value
        return (
            f"{loss!r}'s {what} is {describe(value)} at {_at(first.index)}, from finite inputs "
            f"(ℓ = {float(logp[n, t]):.4g}, ℓ_old = {float(old[n, t]):.4g}, "
            f"A = {float(batch.advantages[n, t]):.4g})"
        )
    found = find(obj.weights, non_finite, mask)
    if found is not None:
        return (
            f"the aggregation weight a_t is {describe(found.value)} at {_at(found.index)} "
            "(loss.aggregation and loss.loss_scale_factor set it)"
        )
    found = find(obj.coefficient, non_finite, mask)
    if found is not None:
        return (
            f"c_t = a_t·g_t overflows {_dtype(obj.coefficient)} at {_at(found.index)}, from "
            "finite a_t and g_t"
        )
    return (
        "every input and every per-token value c_t is finite: the non-finite entries arise in "
        "the sums Σ_v over the vocabulary or ∂L/∂W = Σ_t (∂L/∂z_t) h_tᵀ over the tokens, which "
        f"overflow {_dtype(batch.weight)}"
    )
