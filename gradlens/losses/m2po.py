"""M2PO: PPO with a second-moment mask on the staleness of the batch (Zheng et al., "Prosperity
before Collapse: How Far Can Off-Policy RL Reach with Stale Data on LLMs?", arXiv 2510.01161),
as AReaL implements it (``areal/trainer/ppo/actor.py`` ``_apply_m2po_masking``, 4aef98d).

Per token, the squared log-ratio between the behaviour policy that sampled it (μ, the inference
engine: ``rollout_logp``) and the proximal policy π_old the PPO ratio is taken against:

    M2_t = (ℓ_μ,t − ℓ_old,t)²

Over all valid tokens of the batch, sorted by M2 from the largest, the first k are masked, with k
the smallest number for which the mean M2 of the tokens left is below τ = ``loss.m2po_threshold``
(if no k < n achieves it, n − 1 are masked: AReaL never masks every token). Then

    per-token loss  ppo_clip's, times M2_mask        g = −A·r·M·M2_mask,  r = π_θ/π_old

with ``ppo_clip``'s mask M (eps_low, eps_high, dual clip and OPSM as configured). The mask is a
batch-level selection: whether a token is masked depends on every other token's M2 (coupling
``batch``). Ties in M2 are broken by position (the earlier token in row-major order is masked
first: a stable sort; AReaL's sort does not specify an order).
Zero when: A = 0, M = 0, or the token is among the masked largest-M2 tokens.

Traps. AReaL removes the masked tokens from its loss mask, so they also leave the token-mean
denominator; gradlens keeps the run's aggregation weights (under ``token_mean`` every kept token's
c_t is then N_kept/N_tok of AReaL's). AReaL's M2PO example (``examples/math/gsm8k_m2po.yaml``)
sets ``eps_clip: 0.0``, which in AReaL's clamp(r, 1 − 0, 1 + 0) clips at r = 1 on both sides
(not "no clip"); reproduce it with ``eps_low = eps_high = 0``. Without rollout log-probs M2 = 0
everywhere, nothing is masked and M2PO is ``ppo_clip`` (``compare`` says μ is missing).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ppo_clip
from gradlens.losses.registry import register


def second_moment_mask(m2: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """[N, T] bool: the valid tokens M2PO masks, the largest M2 first (see the docstring)."""
    values = m2[mask]  # [M], row-major
    out = torch.zeros_like(mask)
    n = values.numel()
    if n == 0:
        return out
    order = torch.sort(values, descending=True, stable=True).indices  # [M]
    ranked = values[order]
    suffix = ranked.flip(0).cumsum(0).flip(0)  # Σ of ranked[k:]
    counts = torch.arange(n, 0, -1, dtype=ranked.dtype, device=ranked.device)
    below = torch.nonzero(suffix / counts < threshold).squeeze(-1)
    k = int(below[0]) if below.numel() else n - 1
    dropped = torch.zeros(n, dtype=torch.bool, device=mask.device)
    dropped[order[:k]] = True
    out[mask] = dropped
    return out


def m2po(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """ppo_clip with M2PO's mask: g = −A·r·M·M2_mask."""
    m = inputs.mask
    behaviour = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    gap = torch.where(m, behaviour - inputs.old_logp, 0.0)
    m2 = gap * gap  # [N, T]
    masked = second_moment_mask(m2, m, params.m2po_threshold)
    base = ppo_clip(inputs, params)
    return dataclasses.replace(
        base,
        per_token=torch.where(masked, 0.0, base.per_token),
        per_token_grad=torch.where(masked, 0.0, base.per_token_grad),
        regions={**base.regions, "m2_masked": masked},
        token_metrics={"m2": m2},
    )


register(
    LossSpec(
        name="m2po",
        fn=m2po,
        formula="ppo_clip's loss × M2_mask, M2_t = (ℓ_μ − ℓ_old)²; mask the largest M2 until "
        "the mean of the rest < m2po_threshold",
        grad_formula="−A·r·M·M2_mask",
        zero_when="A = 0; M = 0 (ppo_clip); the token is among the largest-M2 tokens masked",
        paper="M2PO arXiv 2510.01161; AReaL _apply_m2po_masking (actor.m2_threshold)",
        regions=("clip_upper", "clip_lower", "clip_dual", "seq_masked", "m2_masked"),
        post_formula="M·M2_mask·r·|A|·(1 − π_y)",
        needs=("rollout_logp",),
        coupling="batch",
    )
)
