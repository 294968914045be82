"""Staleness: the ratio r = π_θk/π_old along the optimizer steps taken on the rollout batch.

For each point θ_k of the trajectory (`gradlens.containers.StalePoint`), over the valid tokens:
the quantiles of r, the k3 estimate mean(r − 1 − log r) of KL(π_old‖π_θk), and the clip
fractions with the run's eps_low/eps_high (A > 0 ∧ r > 1 + eps_high; A < 0 ∧ r < 1 − eps_low),
whose sum is verl's actor/pg_clipfrac.
"""

from __future__ import annotations

from torch import Tensor

from gradlens.containers import StalenessRecord, StalePoint
from gradlens.diagnostics.numbers import num, quantiles
from gradlens.results import Staleness, StaleStep


def stale_step(
    point: StalePoint,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> StaleStep:
    """Ratio statistics and clip fractions of one point of the trajectory."""
    log_r = (point.logp - old_logp)[mask].double()  # [M]
    r = log_r.exp()
    a = adv[mask].double()
    m = max(int(mask.sum()), 1)
    upper = float(((a > 0) & (r > 1 + eps_high)).sum()) / m
    lower = float(((a < 0) & (r < 1 - eps_low)).sum()) / m
    p05, p50, p95 = quantiles(r, (0.05, 0.5, 0.95))
    empty = r.numel() == 0
    return StaleStep(
        step=point.step,
        loss=None if point.loss is None else num(point.loss),
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


def staleness(
    record: StalenessRecord,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> Staleness:
    """The report section of the whole trajectory."""
    return Staleness(
        steps=record.steps,
        optimizer=record.optimizer,
        lr=record.lr,
        loss=record.loss,
        trajectory=[
            stale_step(p, old_logp, adv, mask, eps_low, eps_high) for p in record.trajectory
        ],
    )
