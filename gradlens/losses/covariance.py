"""Clip-Cov and KL-Cov: act on the few tokens whose covariance drives entropy collapse (Cui et al.,
"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617),
as verl implements them (``compute_policy_loss_clip_cov`` and ``_kl_cov``, 1dda039, adapted from
PRIME-RL/Entropy-Mechanism-of-RL).

The paper shows that the entropy change of a step follows the covariance between a token's
log-prob and its advantage. Per valid token, centred over the whole batch (means over every
valid token, ℓ detached):

    cov_t = (A_t − mean A)·(ℓ_t − mean ℓ)

``clip_cov`` — PPO-clip (``ppo_clip`` as configured: eps_low, eps_high, dual clip, OPSM), then
a random ⌊ρ·N_tok⌋ (at least 1) of the tokens that the clip kept and whose covariance lies in the
open band (lb, ub) are switched off as well:
    g = −A·r·M·(1 − sel)          ρ, lb, ub = ``loss.clip_cov_ratio``, ``_lb``, ``_ub`` (2e-4, 1, 5)
The choice is random in verl (``torch.randperm`` on the global generator: not reproducible);
gradlens draws it from its own generator seeded with ``loss.selection_seed`` and reports the
chosen tokens as region ``cov_selected`` (the same draw for the closed form and the autograd
twin). verl's ``pg_clipfrac`` for Clip-Cov counts these tokens only, not the PPO-clipped ones
(``clipping.shares.cov_selected`` here; ``clipping.region`` is PPO's clip).
``kl_cov`` — **no PPO clip at all** (the unclipped −A·r on every token), plus a penalty
k·|ℓ − ℓ_old| on the ⌊ρ·N_tok⌋ (at least 1) tokens with the largest covariance:
    per-token loss  −A·r + k·|ℓ − ℓ_old|·sel      g = −A·r + k·sign(ℓ − ℓ_old)·sel
ρ = ``loss.kl_cov_ratio`` (2e-4), k = ``loss.kl_cov_coef``: verl's actor.yaml sets
``ppo_kl_coef: 0.1``, the code's fallback when it is unset is 1.0. Ties in the covariance are
broken by position (the earlier token wins: a stable sort; verl's topk leaves them unspecified).
The penalty is part of the policy term here (verl multiplies it by the rollout IS weights).
Zero when: clip_cov: A = 0, M = 0 or selected; kl_cov: A·r = k·sign(ℓ − ℓ_old)·sel (A = 0 and the
token is unselected or on-policy).

Both selections are batch-level (coupling ``batch``): a token's g_t depends on every other
token's advantage and log-prob. On a batch of one token the covariance is 0: Clip-Cov selects
nothing (its band excludes 0 by default) and KL-Cov selects that token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ppo_clip, ratio
from gradlens.losses.registry import register


def centred_covariance(inputs: TokenInputs) -> Tensor:
    """[N, T] (A − mean A)(ℓ − mean ℓ) over the batch's valid tokens (0 at masked positions)."""
    m = inputs.mask
    n = m.sum().clamp(min=1)
    logp = torch.where(m, inputs.logp.detach(), 0.0)
    adv = torch.where(m, inputs.advantages, 0.0)
    cov = (adv - adv.sum() / n) * (logp - logp.sum() / n)
    return torch.where(m, cov, 0.0)


def _count(mask: Tensor, share: float) -> int:
    return max(int(share * int(mask.sum())), 1)


def clip_cov(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """ppo_clip, and a seeded random ⌊ρ·N⌋ of its kept tokens with lb < cov < ub switched off."""
    m = inputs.mask
    base = ppo_clip(inputs, params)
    off = torch.zeros_like(m)
    for region in base.regions.values():
        off = off | region
    cov = centred_covariance(inputs)
    candidates = m & ~off & (cov > params.clip_cov_lb) & (cov < params.clip_cov_ub)
    index = torch.nonzero(candidates)  # [K, 2], row-major as verl's torch.nonzero
    selected = torch.zeros_like(m)
    if index.shape[0] > 0:
        gen = torch.Generator().manual_seed(params.selection_seed)
        order = torch.randperm(index.shape[0], generator=gen)[: _count(m, params.clip_cov_ratio)]
        chosen = index[order.to(index.device)]
        selected[chosen[:, 0], chosen[:, 1]] = True
    return dataclasses.replace(
        base,
        per_token=torch.where(selected, 0.0, base.per_token),
        per_token_grad=torch.where(selected, 0.0, base.per_token_grad),
        regions={**base.regions, "cov_selected": selected},
    )


def kl_cov(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Unclipped −A·r, plus k·|ℓ − ℓ_old| on the ⌊ρ·N⌋ largest-covariance tokens."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    cov = centred_covariance(inputs)[m]  # [M], row-major
    selected = torch.zeros_like(m)
    if cov.numel() > 0:
        order = torch.sort(cov, descending=True, stable=True).indices
        top = order[: _count(m, params.kl_cov_ratio)]
        flat = torch.zeros(cov.numel(), dtype=torch.bool, device=m.device)
        flat[top] = True
        selected[m] = flat
    r = ratio(inputs)
    log_r = inputs.logp - inputs.old_logp
    k = params.kl_cov_coef
    per_token = torch.where(m, -adv * r, 0.0) + torch.where(selected, k * log_r.abs(), 0.0)
    grad = torch.where(m, -adv * r.detach(), 0.0) + torch.where(
        selected, k * torch.sign(log_r.detach()), 0.0
    )
    return LossTerms(per_token=per_token, per_token_grad=grad, regions={"cov_selected": selected})


register(
    LossSpec(
        name="clip_cov",
        fn=clip_cov,
        formula="ppo_clip's loss × (1 − sel), sel: a seeded random ⌊ρ·N⌋ of the kept tokens with "
        "lb < (A − Ā)(ℓ − ℓ̄) < ub",
        grad_formula="−A·r·M·(1 − sel)",
        zero_when="A = 0; M = 0 (ppo_clip); the token is selected",
        paper="Clip-Cov, arXiv 2505.22617; verl `clip_cov` (random choice: seeded here, "
        "loss.selection_seed)",
        regions=("clip_upper", "clip_lower", "clip_dual", "seq_masked", "cov_selected"),
        post_formula="M·(1 − sel)·r·|A|·(1 − π_y)",
        coupling="batch",
    )
)
register(
    LossSpec(
        name="kl_cov",
        fn=kl_cov,
        formula="−A·r + k·|ℓ − ℓ_old|·sel (no PPO clip), sel: the ⌊ρ·N⌋ largest (A − Ā)(ℓ − ℓ̄)",
        grad_formula="−A·r + k·sign(ℓ − ℓ_old)·sel",
        zero_when="−A·r + k·sign(ℓ − ℓ_old)·sel = 0 (A = 0 and unselected or ℓ = ℓ_old)",
        paper="KL-Cov, arXiv 2505.22617; verl `kl_cov` (k = ppo_kl_coef: 0.1 in actor.yaml, "
        "1.0 as the code's fallback)",
        regions=("cov_selected",),
        post_formula="|g|·(1 − π_y), g = −A·r + k·sign(ℓ − ℓ_old)·sel",
        coupling="batch",
    )
)
