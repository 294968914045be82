"""FIPO: Future-KL Influenced Policy Optimization (arXiv 2603.19835), as ms-swift's
``loss_type="fipo"`` computes it (``_compute_fipo_influence``, 3602360; docs
``GRPO/AdvancedResearch/FIPO.md``).

PPO-clip's per-token loss, weighted by a detached credit f_t that looks at what the current
update does to the *rest* of the response. With Δ_k = ℓ_k − ℓ_old,k (the signed log-ratio),
γ = 2^(−1/``loss.fipo_decay_rate``) (decay rate 32: a half-life of 32 tokens):

    F_t = Σ_{k ≥ t} γ^{k−t}·Δ_k                      the discounted future KL, token t included
    f_t = sg[clip(e^{F_t}, 1, 1 + R)]                 R = ``loss.fipo_clip_range`` (0.2);
                                                      [1 − R, 1 + R] with fipo_clip_high_only off
    safety: A < 0 and r > S  ⇒  f_t = clip(f_t, 0.8, 1)   S = ``loss.fipo_safety_threshold`` (4)
    per-token loss  f_t·(ppo_clip's per-token loss)    g = f_t·(−A·r·M)

With the dual clip set (``loss.dual_clip`` c, ms-swift's ``delta``: the same rule), tokens with
r > c do not contribute to F (Δ_k := 0 there), as in ms-swift. A token's weight depends on the
tokens after it in its sequence (coupling ``sequence``); the distance k − t counts positions.
Zero when: ppo_clip's gradient is zero (A = 0, M = 0); f_t ≥ 0.8 > 0 never zeroes it.

Traps. With ``fipo_clip_high_only`` (the default) f_t ∈ [1, 1.2], and the safety clamp to
[0.8, 1] then sets it to exactly 1: the documented "[0.8, 1]" range only matters with the
two-sided clip. ms-swift normalises ``fipo`` by the global token count (``token_mean``) and a
GA-dependent double division was reported (ms-swift issue 10117). F_t, f_t are reported as
metrics ``future_kl`` and ``fipo_weight`` (aggregated like the loss).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ppo_clip, ratio
from gradlens.losses.registry import register


def future_kl(delta: Tensor, gamma: float) -> Tensor:
    """[N, T] F_t = Σ_{k≥t} γ^{k−t}·Δ_k along each row (Δ already 0 where it does not count),
    by the recurrence F_t = Δ_t + γ·F_{t+1} from the end: O(N·T) memory for any length."""
    out = torch.zeros_like(delta)
    running = torch.zeros_like(delta[:, 0])  # [N]
    for t in range(delta.shape[-1] - 1, -1, -1):
        running = delta[:, t] + gamma * running
        out[:, t] = running
    return out


def fipo_weight(inputs: TokenInputs, params: LossParams) -> tuple[Tensor, Tensor, Tensor]:
    """([N, T] f_t, [N, T] F_t, [N, T] bool safety-clamped tokens), detached."""
    m = inputs.mask
    rd = ratio(inputs).detach()
    delta = torch.where(m, inputs.logp.detach() - inputs.old_logp, 0.0)
    if params.dual_clip is not None:
        delta = torch.where(rd > params.dual_clip, 0.0, delta)
    f_kl = torch.where(m, future_kl(delta, 2.0 ** (-1.0 / params.fipo_decay_rate)), 0.0)
    weight = torch.exp(f_kl)
    if params.fipo_clip_range:
        low = 1.0 if params.fipo_clip_high_only else 1.0 - params.fipo_clip_range
        weight = torch.clamp(weight, low, 1.0 + params.fipo_clip_range)
    safety = torch.zeros_like(m)
    if params.fipo_safety_threshold is not None:
        safety = (inputs.advantages < 0) & (rd > params.fipo_safety_threshold) & m
        weight = torch.where(safety, torch.clamp(weight, 0.8, 1.0), weight)
    return torch.where(m, weight, 0.0), f_kl, safety


def fipo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """f_t·(ppo_clip's per-token loss); g = f_t·(−A·r·M)."""
    weight, f_kl, safety = fipo_weight(inputs, params)
    base = ppo_clip(inputs, params)
    return dataclasses.replace(
        base,
        per_token=weight * base.per_token,
        per_token_grad=weight * base.per_token_grad,
        regions={**base.regions, "fipo_safety": safety},
        token_metrics={"future_kl": f_kl, "fipo_weight": weight},
    )


register(
    LossSpec(
        name="fipo",
        fn=fipo,
        formula="f_t·(ppo_clip's loss), f_t = sg clip(exp(Σ_{k≥t} γ^{k−t}(ℓ_k − ℓ_old,k)), 1, 1+R)",
        grad_formula="f_t·(−A·r·M)",
        zero_when="A = 0; M = 0 (ppo_clip's rules)",
        paper="FIPO arXiv 2603.19835; ms-swift loss_type=fipo (decay 32, clip 0.2 high only, "
        "safety 4)",
        regions=("clip_upper", "clip_lower", "clip_dual", "seq_masked", "fipo_safety"),
        post_formula="f_t·M·r·|A|·(1 − π_y)",
        coupling="sequence",
    )
)
