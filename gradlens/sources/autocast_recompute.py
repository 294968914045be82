"""A transformer block whose backward recomputes it under autocast in a lower precision.

Activation checkpointing (`gradlens.sources.forward.checkpointed_blocks`) runs each block's
forward twice: once without autograd, keeping only the block's input x, and once more in the
backward, with autograd, only to pull the cotangent back through it. Here that second run is
made under ``torch.autocast`` in a lower dtype d (bfloat16):

    forward:   y = B(x; θ)                                  the model's dtype, no autograd
    backward:  ỹ = B_d(x; θ)   (autocast: products in d)    with autograd
               (∂L/∂x, ∂L/∂θ) = vjp(B_d at x; ∂L/∂y)

So y, and everything computed from it — the log-probs, the loss, its gradient at the logits —
is exactly the full-precision forward's; only the Jacobian the cotangent goes back through is
the lower-precision one. That is the gradient of a mixed-precision trainer: products with
operands rounded to d (a relative 2^-8 each for bf16) and accumulated in float32, the
parameters and the residual stream (x, y, ∂L/∂x, ∂L/∂y) in float32, the parameters' gradients
cast back to their dtype. On the CPU the attention inside the block runs in float32 on the
bf16-rounded q, k, v (`gradlens.sources.float32_attention`: the CPU's bf16 attention backward
is the slower one). The stale steps use it (``source.stale.grad_dtype``,
gradlens.sources.staleness): they only need to move θ as a trainer would, and Adam divides each
coordinate of the update by its own running RMS, so a relative error of a few 2^-8 in a
gradient changes most coordinates of the step by about as much (one whose gradient lies within
its rounding of zero can change sign, as it can between two trainers); the diagnosis at θ_N is
computed in full precision from whatever θ_N is.

The recomputation is reentrant (the block's graph is built and differentiated inside the
outer backward, by ``torch.autograd.backward``), so the parameters' gradients are accumulated
into their ``.grad`` as that backward reaches them, and the hooks registered on them run
(the stale steps' update inside the backward). This needs every differentiable input of the
block to be x: a block with another argument that requires grad, or whose x does not, is
checkpointed as usual by the caller (`lowerable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradlens.sources.block_call import (
    depends_on_parameters,
    hidden_in,
    hidden_out,
    other_keywords,
    replace_out,
    with_hidden,
)
from gradlens.sources.float32_attention import attention_in_float32


class _AutocastRecompute(torch.autograd.Function):
    """y = run(x) without autograd; the backward differentiates run(x) made again under
    autocast in ``dtype``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, run: Callable[[Tensor], Tensor], dtype: torch.dtype
    ) -> Tensor:
        ctx.run = run
        ctx.dtype = dtype
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        x = saved.detach().requires_grad_(True)
        with (
            torch.enable_grad(),
            torch.autocast(x.device.type, dtype=ctx.dtype),
            attention_in_float32(x.device),
        ):
            y = ctx.run(x)
        torch.autograd.backward(y, grad.to(y.dtype))
        return x.grad, None, None


def lowerable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """The block's gradient flows in through its hidden states x alone: x requires grad and no
    other argument depends on a parameter (the recomputation differentiates x only)."""
    if not hidden_in(args, kwargs).requires_grad:
        return False
    return not (depends_on_parameters(args[1:]) or depends_on_parameters(other_keywords(kwargs)))


def autocast_recomputed(
    original: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dtype: torch.dtype,
) -> Any:
    """``original(*args, **kwargs)`` (a block's forward), differentiable by the recomputation
    under autocast in ``dtype`` (module docstring). The caller has checked `lowerable`. A block
    that returns a tuple gets its other entries back as they were computed, without gradient
    (attention weights, a cache)."""
    forward_out: list[Any] = []  # the forward's own output (not the recomputation's)

    def run(h: Tensor) -> Tensor:
        call_args, call_kwargs = with_hidden(args, kwargs, h)
        out = original(*call_args, **call_kwargs)
        if not forward_out:
            forward_out.append(out)
        return hidden_out(out)

    y = _AutocastRecompute.apply(hidden_in(args, kwargs), run, dtype)
    return replace_out(forward_out[0], y)
