"""Staleness: the ratio r = π_θk/π_old along the optimizer steps taken on the rollout batch.

For each point θ_k of the trajectory (`gradlens.containers.StalePoint`), over the valid tokens:
the quantiles of r, the k3 estimate mean(r − 1 − log r) of KL(π_old‖π_θk), and the clip
fractions with the run's eps_low/eps_high (A > 0 ∧ r > 1 + eps_high; A < 0 ∧ r < 1 − eps_low),
whose sum is verl's actor/pg_clipfrac.

A batch far beyond one PPO step (`beyond_ppo`): PPO-style trainers keep an update near a KL of
0.01 (the target KL of common PPO implementations, e.g. OpenAI Spinning Up's ``target_kl`` and
RLlib's ``kl_target``); a trajectory that ends above `FAR_KL`, ten times that KL, or with more
than `FAR_CLIP` of its tokens clipped (clip fractions of healthy runs are a few to twenty per
cent, though short completions of a small model clip more at the same KL) describes a batch no
trainer would keep training on, and the report says so.
"""

from __future__ import annotations

from torch import Tensor

from gradlens.containers import StalenessRecord, StalePoint
from gradlens.diagnostics.numbers import num, quantiles
from gradlens.results import Staleness, StaleStep

FAR_KL = 0.1  # KL(π_old‖π_θ) k3 beyond which the batch is far from one PPO step
FAR_CLIP = 0.5  # pg_clipfrac beyond which it is


def kl_k3(logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
    """mean(r − 1 − log r) over the valid tokens, r = π_θ/π_old (0 without valid tokens)."""
    log_r = (logp - old_logp)[mask].double()
    if log_r.numel() == 0:
        return 0.0
    return float((log_r.exp() - 1 - log_r).mean())


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
        lr=point.lr,
        probes=point.probes,
        subset_probes=point.subset_probes,
        loss=None if point.loss is None else num(point.loss),
        ratio_mean=None if empty else num(r.mean()),
        ratio_min=None if empty else num(r.min()),
        ratio_p05=p05,
        ratio_p50=p50,
        ratio_p95=p95,
        ratio_max=None if empty else num(r.max()),
        kl_k3=None if empty else num(kl_k3(point.logp, old_logp, mask)),
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
        target_kl=record.target_kl,
        loss=record.loss,
        trajectory=[
            stale_step(p, old_logp, adv, mask, eps_low, eps_high) for p in record.trajectory
        ],
        model_pass=record.model_pass,
    )


def beyond_ppo(section: Staleness) -> str | None:
    """A sentence when the last point of the trajectory is far beyond one PPO step."""
    if not section.trajectory or section.steps == 0:
        return None
    end = section.trajectory[-1]
    kl = end.kl_k3 if end.kl_k3 is not None else float("inf")
    if kl <= FAR_KL and end.clip_region <= FAR_CLIP:
        return None
    how = (
        f"lr {section.lr:g} as given (source.stale.target_kl: null)"
        if section.target_kl is None
        else f"source.stale.target_kl = {section.target_kl:g}"
    )
    return (
        f"the {section.steps} stale step(s) moved π_θ far beyond one PPO step: KL(π_old‖π_θ) "
        f"k3 = {kl:.3g}, {end.clip_region:.0%} of tokens clipped, max ratio "
        f"{end.ratio_max if end.ratio_max is not None else float('inf'):.3g} ({how}); PPO-style "
        f"updates stay near KL 0.01 (beyond KL {FAR_KL:g} or {FAR_CLIP:.0%} clipped is "
        "reported): set source.stale.target_kl, or a smaller source.stale.lr"
    )
