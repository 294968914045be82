"""GMPO: Geometric-Mean Policy Optimization (Zhao et al., arXiv 2507.20673), as verl ``geo_mean``
(1dda039) and TRL's experimental ``GMPOTrainer`` compute it.

GRPO averages token ratios arithmetically, so one outlier ratio dominates a sequence. GMPO takes
the geometric mean of the token ratios of a sequence, each clipped first, one-sidedly by the sign
of the sequence advantage Â_i and **in log space**: with δ_t = ℓ_t − ℓ_old,t,

    δ̃_t = min(δ_t, ε_hi)  if Â_i > 0,      max(δ_t, −ε_lo)  if Â_i < 0,      δ_t  if Â_i = 0
    ρ_i = exp( (1/|y_i|) Σ_t δ̃_t )                       the clipped geometric-mean ratio
    sequence loss  −Â_i·ρ_i                               carried by every token (as gspo)
    g_t = −Â_i·ρ_i·1[token t unclipped]                   region clip_upper / clip_lower

ε = ``loss.gmpo_eps_low``, ``loss.gmpo_eps_high`` (0.4 each: ratios in (e^−0.4, e^0.4) =
(0.670, 1.492), the paper's and TRL's default). Unlike GSPO the clip is per token: a clipped
token drops out of the gradient while its sequence's other tokens keep theirs, and ρ_i still
contains its clipped value. The reported g_t follows gspo's convention: ∂/∂ℓ_t of the
sequence loss is −Â_i·ρ_i·1[unclipped]/|y_i|, and with an aggregation weight a constant within
a sequence (all of gradlens's) c_t = a·|y_i|·that = a·g_t.
Zero when: Â_i = 0, or token t is clipped.

Traps. verl's ``geo_mean`` ignores ``loss_agg_mode`` and takes a plain mean over sequences (the
paper's and TRL's too): that is ``seq_mean_token_mean`` here (gradlens applies
``loss.aggregation``). verl reads PPO's ``clip_ratio_low/high`` (0.2 by default) as the
log-space widths, not the paper's 0.4. TRL with ``use_liger_kernel=True`` silently trains GRPO
instead (TRL issues 6808, 7270). verl uses the sign of each token's advantage (identical for
outcome rewards); gradlens uses the sequence's.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.off_policy_mask import sequence_mean
from gradlens.losses.registry import register


def gmpo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−Â_i·exp(mean_t δ̃_t) per sequence; g_t = −Â_i·ρ_i·1[t unclipped]."""
    m = inputs.mask
    adv_seq = sequence_mean(torch.where(m, inputs.advantages, 0.0), m)[:, None]  # [N, 1]
    adv = adv_seq.expand_as(inputs.logp)  # [N, T]
    delta = inputs.logp - inputs.old_logp  # differentiable
    dd = delta.detach()
    regions = {
        "clip_upper": (adv > 0) & (dd > params.gmpo_eps_high) & m,
        "clip_lower": (adv < 0) & (dd < -params.gmpo_eps_low) & m,
    }
    clipped = torch.where(
        regions["clip_upper"],
        torch.full_like(dd, params.gmpo_eps_high),
        torch.where(regions["clip_lower"], -params.gmpo_eps_low, delta),
    )
    rho = torch.exp(sequence_mean(clipped, m))[:, None]  # [N, 1]
    per_token = torch.where(m, (-adv_seq * rho).expand_as(inputs.logp), 0.0)
    off = regions["clip_upper"] | regions["clip_lower"]
    grad = torch.where(m & ~off, -adv * rho.detach(), 0.0)
    return LossTerms(per_token=per_token, per_token_grad=grad, regions=regions, sequence_level=True)


register(
    LossSpec(
        name="gmpo",
        fn=gmpo,
        formula="−Â_i·exp(mean_t δ̃_t) per sequence, δ̃ = ℓ − ℓ_old clipped per token in log space "
        "(one-sided by the sign of Â_i)",
        grad_formula="−Â_i·ρ_i·1[t unclipped] (ρ_i the clipped geometric-mean ratio)",
        zero_when="Â_i = 0; Â_i>0 ∧ δ_t>gmpo_eps_high; Â_i<0 ∧ δ_t<−gmpo_eps_low",
        paper="GMPO arXiv 2507.20673; verl `geo_mean` (ignores loss_agg_mode), TRL "
        "experimental GMPOTrainer",
        regions=("clip_upper", "clip_lower"),
        post_formula="1[unclipped]·ρ_i·|Â_i|·(1 − π_y)",
        coupling="sequence",
        rule_words=(
            ("clip_upper", "Â > 0 and log r > ε_high (in log space, per token)"),
            ("clip_lower", "Â < 0 and log r < −ε_low (in log space, per token)"),
        ),
    )
)
