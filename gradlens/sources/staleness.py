"""Staleness: N optimizer steps on the rollout batch, so that π_θ ≠ π_old for real.

In PPO-style training the policy takes several optimizer steps (mini-batches, epochs) on one
rollout batch; from the second step on, the parameters θ that compute π_θ have moved away from
the θ_old that computed π_old, and the ratio r = π_θ/π_old leaves 1. Here:

    θ_0 = θ_old;  for k = 0 … N−1:  θ_{k+1} = optimizer step on L_stale(θ_k)

with the optimizer (sgd, adam, adamw), learning rate and loss of ``source.stale``; the loss is
any registered loss, aggregated as in the run (``loss.aggregation``). π_old is the training
pass at θ_0 (so at N = 0 the ratio is exactly 1), and after each step k the ratio statistics
and clip fractions (with ``loss.eps_low``/``eps_high``) are recorded, k = 0 … N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.containers import Batch
from gradlens.diagnostics.numbers import num, quantiles
from gradlens.model_results import Staleness, StaleStep
from gradlens.progress import report
from gradlens.sources.model import (
    Sequences,
    aggregated_loss,
    final_hidden,
    head_weight,
    policy_pass,
)

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def ratio_step(
    step: int,
    loss: float | None,
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> StaleStep:
    """Ratio statistics and clip fractions of one point of the trajectory."""
    log_r = (logp - old_logp)[mask].double()  # [M]
    r = log_r.exp()
    a = adv[mask].double()
    m = max(int(mask.sum()), 1)
    upper = float(((a > 0) & (r > 1 + eps_high)).sum()) / m
    lower = float(((a < 0) & (r < 1 - eps_low)).sum()) / m
    p05, p50, p95 = quantiles(r, (0.05, 0.5, 0.95))
    empty = r.numel() == 0
    return StaleStep(
        step=step,
        loss=loss,
        ratio_mean=None if empty else num(r.mean()),
        ratio_min=None if empty else num(r.min()),
        ratio_p05=p05,
        ratio_p50=p50,
        ratio_p95=p95,
        ratio_max=None if empty else num(r.max()),
        kl_k3=None if empty else num((r - 1 - log_r).mean()),
        clip_upper=upper,
        clip_lower=lower,
        clip_region=upper + lower,
    )


@dataclass(frozen=True)
class StaleResult:
    staleness: Staleness
    old_logp: Tensor  # [N, T] log π_old(y_t): the training pass at θ_0
    hidden: Tensor  # [N, T, H] h_t/T at θ_N (detached), for the batch


def stale_steps(
    model: nn.Module,
    seqs: Sequences,
    advantages: Tensor,
    rollout_logp: Tensor,
    src: Any,
    spec: Any,
    params: Any,
    agg: Any,
    bias: bool,
) -> StaleResult:
    """Take the N steps in place on ``model``: the trajectory, π_old, and h at θ_N."""
    cfg = src.stale
    mask, tokens = seqs.loss_mask, seqs.tokens
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr)
    trajectory: list[StaleStep] = []
    old_logp: Tensor | None = None
    for k in range(cfg.steps + 1):
        report("stale steps", k, cfg.steps)
        last = k == cfg.steps
        with torch.set_grad_enabled(not last):
            hidden = final_hidden(model, seqs, src.temperature, bias)
            policy = policy_pass(hidden, head_weight(model), tokens, mask)
            logp = policy.logp  # [N, T]
        if old_logp is None:
            old_logp = logp.detach()  # π_old: the training pass at θ_old
        loss_value = None
        if not last:
            batch = Batch(
                hidden=hidden.detach(),
                weight=head_weight(model).detach(),
                tokens=tokens,
                mask=mask,
                old_logp=old_logp,
                advantages=advantages,
                rollout_logp=rollout_logp.to(old_logp.dtype),
                groups=torch.arange(mask.shape[0], device=mask.device) // src.group_size,
            )
            loss = aggregated_loss(spec, batch, policy, params, agg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = num(loss.detach())
        trajectory.append(
            ratio_step(
                k,
                loss_value,
                logp.detach(),
                old_logp,
                advantages,
                mask,
                params.eps_low,
                params.eps_high,
            )
        )
    optimizer.zero_grad(set_to_none=True)
    assert old_logp is not None
    staleness = Staleness(
        steps=cfg.steps, optimizer=cfg.optimizer, lr=cfg.lr, loss=cfg.loss, trajectory=trajectory
    )
    return StaleResult(staleness, old_logp, hidden.detach())
