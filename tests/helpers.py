"""Small builders shared by the maths tests: batches from tensors, configs, error measures."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from gradlens.config import Config, validate
from gradlens.containers import Batch
from gradlens.grads import Aggregation, LossGradients, closed_form, softmax_view
from gradlens.losses import LossParams, get_loss

F64 = torch.float64

# The distribution of losses.md §12: π = [0.5, 0.2, 0.15, 0.1, 0.05].
PI = [0.5, 0.2, 0.15, 0.1, 0.05]


def make_batch(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    old_logp: Tensor | None = None,
    advantages: Tensor | None = None,
    rollout_logp: Tensor | None = None,
) -> Batch:
    """A `Batch` straight from tensors; old_logp defaults to on-policy (ℓ_old = ℓ exactly)."""
    acc = F64 if weight.dtype == F64 else torch.float32
    n, t = mask.shape
    batch = Batch(
        hidden=hidden,
        weight=weight,
        tokens=tokens.long(),
        mask=mask.bool(),
        old_logp=torch.zeros(n, t, dtype=acc) if old_logp is None else old_logp.to(acc),
        advantages=torch.ones(n, t, dtype=acc) if advantages is None else advantages.to(acc),
        rollout_logp=rollout_logp,
        source="tests",
    )
    return on_policy(batch) if old_logp is None else batch


def on_policy(batch: Batch) -> Batch:
    """The same batch with ℓ_old set bit-for-bit to gradlens's own ℓ, so that r = 1 exactly."""
    return dataclasses.replace(batch, old_logp=softmax_view(batch).logp.clone())


def random_batch(
    seed: int,
    n: int = 6,
    t: int = 5,
    v: int = 11,
    h: int = 7,
    dtype: torch.dtype = F64,
    logit_scale: float = 1.5,
    drift: float = 0.8,
) -> Batch:
    """A seeded batch with ragged masks, per-sequence advantages of both signs (and an exact
    zero), log-ratio noise log r ~ N(0, drift²) on every valid token, and prompt groups of two
    consecutive sequences."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)  # [N]
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    hidden = torch.randn(n, t, h, generator=gen, dtype=F64)  # [N, T, H]
    weight = logit_scale * torch.randn(v, h, generator=gen, dtype=F64) / math.sqrt(h)  # [V, H]
    tokens = torch.randint(0, v, (n, t), generator=gen)  # [N, T]
    adv_seq = torch.randn(n, generator=gen, dtype=F64)  # [N]
    adv_seq[0] = 0.0  # A = 0: zero gradient, never clipped
    advantages = adv_seq[:, None].expand(n, t).clone()  # [N, T]
    log_r = drift * torch.randn(n, t, generator=gen, dtype=F64)  # [N, T]
    batch = make_batch(hidden.to(dtype), weight.to(dtype), tokens, mask, advantages=advantages)
    groups = torch.arange(n) // 2  # prompt groups of two consecutive sequences (for real)
    return dataclasses.replace(
        batch, old_logp=batch.old_logp - log_r.to(batch.old_logp.dtype), groups=groups
    )


def gradients(
    batch: Batch,
    loss: str,
    params: LossParams | None = None,
    mode: str = "token_mean",
    loss_scale_factor: float | None = None,
) -> LossGradients:
    """Closed-form gradients of one loss."""
    agg = Aggregation(mode, loss_scale_factor)
    return closed_form(batch, softmax_view(batch), get_loss(loss), params or LossParams(), agg)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Normwise max|a − b| / max|b| in float64 (0 when both are exactly 0)."""
    a, b = actual.double(), expected.double()
    diff, scale = float((a - b).abs().max()), float(b.abs().max())
    return diff if scale == 0.0 else diff / scale


def literal_config(
    sequences: list[list[dict[str, Any]]], losses: list[str], dtype: str = "float64", **loss: Any
) -> Config:
    """A validated literal-source config: ``sequences`` is a list of lists of positions."""
    return validate(
        {
            "dtype": dtype,
            "losses": losses,
            "loss": loss,
            "diagnostics": {"token_details": "on"},
            "source": {"kind": "literal", "sequences": [{"positions": s} for s in sequences]},
        }
    )
