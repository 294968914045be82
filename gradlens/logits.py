"""The logit path every stage shares, so that each computes π_θ bit-for-bit the same way.

z_t = W h_t is computed in the operand dtype (a bf16 GEMM accumulates in fp32 and rounds its
output to bf16, as a trainer's lm_head does); the softmax and everything after it run in
float32, or float64 when the operands are float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_dtype(operand: torch.dtype) -> torch.dtype:
    """float64 operands keep float64; anything narrower is upcast to float32."""
    return torch.float64 if operand == torch.float64 else torch.float32


def compute_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """[..., H] × [V, H] → [..., V] logits in the softmax dtype."""
    return (hidden @ weight.T).to(softmax_dtype(weight.dtype))


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """[..., V], [...] → [...] log π(y) = z_y − logsumexp(z)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
