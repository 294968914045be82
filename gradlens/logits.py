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


def kept_entries(kept_ids: Tensor, start: int, stop: int) -> Tensor:
    """[M, K] ids of each token's kept set K_t (−1: padding) → [M, stop − start] bool, True where
    vocabulary row ``start + j`` is in K_t (one chunk of the vocabulary; all of it for ``start``
    0 and ``stop`` V)."""
    inside = (kept_ids >= start) & (kept_ids < stop)  # [M, K]
    local = torch.where(inside, kept_ids - start, torch.zeros_like(kept_ids))  # [M, K]
    hits = torch.zeros(kept_ids.shape[0], stop - start, dtype=torch.int32, device=kept_ids.device)
    return hits.scatter_add_(-1, local, inside.to(torch.int32)) > 0  # padding adds 0


def restrict_logits(logits: Tensor, keep: Tensor) -> Tensor:
    """z with −inf outside the kept set: log_softmax of it is log π̃ = log π − log S on K_t, −inf
    elsewhere, and its gradient there is exactly 0 (DeepSeek-V3.2's keep sampling mask)."""
    return logits.masked_fill(~keep, -torch.inf)
