"""MiniRL: Qwen's decoupled, masked, truncated policy gradient (arXiv 2512.01374 v3, eq. 7, §4.2).

Three policies: the inference engine's μ_old that sampled y (``rollout_logp``), the training
engine's π_old at the same parameters (``old_logp``, the proximal policy) and π_θ.

    J = E_{y~μ_old} [ Σ_t M_t · sg[π_θ(y_t)/μ_old(y_t)] · A · log π_θ(y_t) ]
    M_t = 0 iff (A > 0 and r_t > 1 + eps_high) or (A < 0 and r_t < 1 − eps_low),
    r_t = π_θ/π_old (the PPO ratio against the training-engine policy).

Per-token loss (minimised):  −A·M_t·sg[w_t]·log π_θ(y_t)
Coefficient:                 g_t = −A·M_t·w_t
Zero when:                   A = 0 or M_t = 0.

The truncation (trap A1). The paper "additionally appl[ies] TIS to the token-level IS weight,
with the truncation threshold set to 5". It reads two ways, both offered by
``loss.minirl_truncation`` with the cap C = ``loss.minirl_cap``:

    literal     w = min(π_θ/μ_old, C)                 the IS weight of eq. 7, truncated
    decoupled   w = r·min(π_old/μ_old, C)             decoupled PPO + token TIS: only the
                                                       training–inference ratio ρ is truncated

They agree while neither cap binds (π_θ/μ_old ≤ C and ρ ≤ C) and differ as soon as one does.
Region ``is_truncated`` marks the tokens whose truncation binds in the reading chosen.

Without rollout log-probs μ_old := π_old (verl's bypass mode) and ``compare`` says so; then
ρ = 1, ``decoupled`` is PPO-clip's gradient and ``literal`` caps r itself at C.

The paper sums over tokens with no length normalisation (``seq_mean_token_sum``) and uses
eps_low = 0.2, eps_high = 0.27, with advantages R − mean (``advantage.normalization:
group_mean``, trap A2); gradlens applies ``loss.aggregation``, ``loss.eps_low/eps_high`` as
configured, so set them to reproduce the paper. Dual clip and OPSM are not part of MiniRL and
are ignored here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError, unknown_name_message
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register

# (the raw ratio that is truncated, the weight w) from (ℓ detached, ℓ_old, ℓ_rollout, r, C)
Truncation = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def literal(
    logp: Tensor, old: Tensor, rollout: Tensor, r: Tensor, cap: float
) -> tuple[Tensor, Tensor]:
    raw = torch.exp(logp - rollout)  # π_θ/μ_old
    return raw, torch.clamp(raw, max=cap)


def decoupled(
    logp: Tensor, old: Tensor, rollout: Tensor, r: Tensor, cap: float
) -> tuple[Tensor, Tensor]:
    raw = torch.exp(old - rollout)  # ρ = π_old/μ_old
    return raw, r * torch.clamp(raw, max=cap)


TRUNCATIONS: dict[str, Truncation] = {"literal": literal, "decoupled": decoupled}


def minirl(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·M·sg[w]·ℓ per token, g_t = −A·M·w, w by ``params.minirl_truncation``."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    logp = inputs.logp.detach()
    rollout = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    r = torch.exp(logp - inputs.old_logp)
    cap = params.minirl_cap
    try:
        truncation = TRUNCATIONS[params.minirl_truncation]
    except KeyError:
        raise GradlensError(
            unknown_name_message("MiniRL truncation", params.minirl_truncation, list(TRUNCATIONS))
        ) from None
    raw, weight = truncation(logp, inputs.old_logp, rollout, r, cap)
    regions = {
        "clip_upper": (adv > 0) & (r > 1.0 + params.eps_high),
        "clip_lower": (adv < 0) & (r < 1.0 - params.eps_low),
        "is_truncated": (raw > cap) & m,
    }
    keep = m & ~(regions["clip_upper"] | regions["clip_lower"])
    g = torch.where(keep, -adv * weight, 0.0)
    return LossTerms(per_token=g * inputs.logp, per_token_grad=g, regions=regions)


register(
    LossSpec(
        name="minirl",
        fn=minirl,
        formula="−A·M·sg[w]·log π_θ(y); w = min(π_θ/μ_old, C) (literal) or "
        "r·min(π_old/μ_old, C) (decoupled)",
        grad_formula="−A·M·w",
        zero_when="A = 0; A>0 ∧ r>1+eps_high; A<0 ∧ r<1−eps_low (r = π_θ/π_old)",
        paper="MiniRL, Qwen arXiv 2512.01374 v3 eq. 7, §4.2; decoupled PPO arXiv 2110.00641",
        regions=("clip_upper", "clip_lower", "is_truncated"),
        post_formula="M·w·|A|·(1 − π_y)",
        needs=("rollout_logp",),
    )
)
