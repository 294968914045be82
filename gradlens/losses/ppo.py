"""PPO without and with the clip, in the seed post's mask form.

Ratio: r_t = π_θ(y_t)/π_old(y_t) = exp(ℓ_t − ℓ_old,t), and ∂r/∂ℓ = r.

``ppo`` — the post's unclipped PPO ("法外狂徒版", the outlaw version):
    per-token loss  −A·r,   g_t = −A·r.
    On-policy (r = 1) it is REINFORCE exactly; as π_old → 0 the sampled-row gradient
    r·A·(1 − π_y) grows as 1/π_old and explodes; as π_θ → 0 it vanishes.

``ppo_clip`` — PPO (Schulman et al. 2017, arXiv 1707.06347) with decoupled bounds (DAPO's
clip-higher, arXiv 2503.14476) and optional dual clip c (arXiv 1912.09729):
    per-token loss  max(−A·r, −A·clip(r, 1 − eps_low, 1 + eps_high)),
                    and for A < 0 with dual clip: min(that, −c·A).
    g_t = −A·r·M_t, with the token mask of Qwen's MiniRL paper (arXiv 2512.01374, eq. 7):
        M_t = 0 iff (A > 0 and r > 1 + eps_high)      "clip_upper"
                 or (A < 0 and r < 1 − eps_low)       "clip_lower"
                 or (A < 0 and r > c), dual clip only  "clip_dual"
    Inequalities are strict: exactly at a bound the gradient is the unclipped one, and A = 0
    is never counted as clipped. With ``opsm_delta`` set, g_t is further multiplied by
    DeepSeek-V3.2's sequence mask (`off_policy_mask`), region "seq_masked".
Zero when: A = 0, or M_t = 0, or the sequence is masked.

Unlike verl, log r is not clamped to ±20 here: gradlens shows the explosion instead of hiding it.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.off_policy_mask import off_policy_sequence_mask
from gradlens.losses.registry import register


def ratio(inputs: TokenInputs) -> torch.Tensor:
    """[N, T] r = exp(ℓ − ℓ_old), differentiable in ℓ; 1 at masked positions."""
    return torch.exp(inputs.logp - inputs.old_logp)


def ppo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Unclipped importance-weighted surrogate −A·r, g_t = −A·r."""
    adv = torch.where(inputs.mask, inputs.advantages, 0.0)
    r = ratio(inputs)
    return LossTerms(per_token=-adv * r, per_token_grad=-adv * r.detach())


def ppo_clip(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Clipped surrogate with optional dual clip and sequence mask, g_t = −A·r·M·M_seq."""
    adv = torch.where(inputs.mask, inputs.advantages, 0.0)
    r = ratio(inputs)
    unclipped = -adv * r
    clipped = -adv * torch.clamp(r, 1.0 - params.eps_low, 1.0 + params.eps_high)
    per_token = torch.maximum(unclipped, clipped)

    rd = r.detach()
    regions = {
        "clip_upper": (adv > 0) & (rd > 1.0 + params.eps_high),
        "clip_lower": (adv < 0) & (rd < 1.0 - params.eps_low),
    }
    if params.dual_clip is not None:
        # min(·, −c·A) written as a where on the strict region, so that a tie r = c keeps the
        # unclipped gradient (torch.minimum would split it 50/50 between the branches).
        regions["clip_dual"] = (adv < 0) & (rd > params.dual_clip)
        per_token = torch.where(regions["clip_dual"], -params.dual_clip * adv, per_token)
    if params.opsm_delta is not None:
        regions["seq_masked"] = off_policy_sequence_mask(inputs, params.opsm_delta)
        per_token = torch.where(regions["seq_masked"], 0.0, per_token)

    switched_off = torch.zeros_like(inputs.mask)
    for region in regions.values():
        switched_off = switched_off | region
    grad = torch.where(switched_off, 0.0, -adv * rd)
    return LossTerms(per_token=per_token, per_token_grad=grad, regions=regions)


register(
    LossSpec(
        name="ppo",
        fn=ppo,
        formula="−A·r,  r = π_θ(y)/π_old(y)",
        grad_formula="−A·r",
        zero_when="A = 0 (grows as 1/π_old when π_old → 0)",
        paper="the seed post's unclipped PPO; importance sampling as in arXiv 1707.06347",
        post_formula="r·|A|·(1 − π_y)",
    )
)
register(
    LossSpec(
        name="ppo_clip",
        fn=ppo_clip,
        formula="max(−A·r, −A·clip(r, 1−eps_low, 1+eps_high)) [dual clip: min(·, −c·A) for A<0]",
        grad_formula="−A·r·M  (× M_seq with opsm_delta)",
        zero_when="A = 0; A>0 ∧ r>1+eps_high; A<0 ∧ r<1−eps_low; A<0 ∧ r>c; OPSM-masked sequence",
        paper="PPO arXiv 1707.06347; mask M: MiniRL arXiv 2512.01374 eq. 7; "
        "dual clip arXiv 1912.09729; OPSM: DeepSeek-V3.2 arXiv 2512.02556 eq. 9",
        regions=("clip_upper", "clip_lower", "clip_dual", "seq_masked"),
        post_formula="M·r·|A|·(1 − π_y)",
    )
)
