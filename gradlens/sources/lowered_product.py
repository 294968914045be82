"""The logit product z = h Wᵀ exact forward, with its backward's products in a lower dtype.

The stale steps' transformer blocks are differentiated in a lower dtype d (bfloat16:
`gradlens.sources.autocast_recompute`); the lm_head's product is the one left in the model's
dtype, and at a large vocabulary its two backward products are a block's worth each:

    forward:   z = h Wᵀ                     in the operands' dtype (exactly the logits the
                                            run computes everywhere, `gradlens.logits`)
    backward:  ∂L/∂h = fl_d(G_d · W_d)      G = ∂L/∂z, operands rounded to d,
               ∂L/∂W = fl_d(G_dᵀ · h_d)     accumulated in float32, the result rounded to d

— what a mixed-precision trainer's lm_head under autocast computes for its backward, and the
same rounding the blocks' backward has: so the log-probs, the loss and G itself are the
full-precision forward's, and only the step the optimizer takes carries d's relative 2^-8 per
operand (an Adam step divides each coordinate by its own RMS; see the blocks' module).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradlens.logits import compute_logits, softmax_dtype


class _LoweredBackwardProduct(torch.autograd.Function):
    """h Wᵀ in the operands' dtype; the backward's two products in ``dtype``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, dtype: torch.dtype
    ) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.dtype = dtype
        return hidden @ weight.T

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        hidden, weight = ctx.saved_tensors
        g = grad.to(ctx.dtype)
        d_hidden = d_weight = None
        if ctx.needs_input_grad[0]:
            d_hidden = (g @ weight.to(ctx.dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            d_weight = (g.T @ hidden.to(ctx.dtype)).to(weight.dtype)
        return d_hidden, d_weight, None


def lowered_logits(dtype: torch.dtype | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The logit function `gradlens.grads.policy_pass` takes: [M, H] × [V, H] → [M, V] in the
    softmax dtype, as `gradlens.logits.compute_logits`, with the backward's products in
    ``dtype`` (module docstring); None: `compute_logits` itself."""
    if dtype is None:
        return compute_logits

    def logits(hidden: Tensor, weight: Tensor) -> Tensor:
        if hidden.dtype == dtype:  # already in d: nothing to lower
            return compute_logits(hidden, weight)
        z: Tensor = _LoweredBackwardProduct.apply(hidden, weight, dtype)
        return z.to(softmax_dtype(weight.dtype))

    return logits
