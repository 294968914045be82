"""GSPO and GSPO-token: one clipped ratio per sequence (Qwen, arXiv 2507.18071).

The sequence ratio is the geometric mean of the token ratios over the |y_i| valid tokens:

    s_i = exp( (1/|y_i|) Σ_t (ℓ_i,t − ℓ_old,i,t) ),      ∂s_i/∂ℓ_i,t = s_i/|y_i|.

``gspo`` — the paper's objective, one term per sequence with Â_i = mean of its token advantages:
    sequence loss  max(−Â_i·s_i, −Â_i·clip(s_i, 1 − eps_low, 1 + eps_high))
    M_i = 0 iff (Â_i > 0 and s_i > 1 + eps_high) or (Â_i < 0 and s_i < 1 − eps_low)
    Every token of sequence i carries the sequence loss as its per-token value
    (`LossTerms.sequence_level`), so ``seq_mean_token_mean`` gives the paper's (1/G)·Σ_i.
    The loss of token t depends on every ℓ of its sequence; with an aggregation weight a that is
    constant within a sequence (all of gradlens's), c_i,t = Σ_s a·∂/∂ℓ_t = a·(−Â_i·s_i·M_i),
    so the reported g_t is −Â_i·s_i·M_i: the |y_i| tokens share the sequence's gradient.
``gspo_token`` — s_i,t = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)] (numerically s_i), per-token advantages:
    per-token loss  max(−A_t·s_i,t, −A_t·clip(s_i,t, 1 − eps_low, 1 + eps_high))
    g_t = −A_t·s_i·M_i,t (∂s_i,t/∂ℓ_t = s_i), the clip decided per token by the sign of A_t.
    Identical to ``gspo`` when the advantage is constant within each sequence.
Zero when: Â = 0, or the sequence (gspo_token: the token) is clipped. The whole sequence is
clipped or kept together.

Aggregation (trap A7): verl's ``compute_policy_loss_gspo`` forces ``seq-mean-token-mean``
whatever ``loss_agg_mode`` says; gradlens respects ``loss.aggregation``. Set it to
``seq_mean_token_mean`` to reproduce the paper and verl; other modes weight a sequence by its
length (what TRL warns about for ``dapo``/``bnpo`` with sequence-level IS). The paper's clip
widths are eps_low = 3e-4, eps_high = 4e-4 (``--set loss.eps_low=3e-4 --set loss.eps_high=4e-4``);
gradlens's shared defaults 0.2/0.28 rarely clip a geometric mean. verl clamps log s ≤ 10;
gradlens does not.

Clip fractions: the regions ``clip_upper``/``clip_lower`` mark every token of a clipped
sequence, so their token shares are verl's token-weighted ``actor/pg_clipfrac``; the region
``seq_clipped`` is also reported per sequence, TRL's sequence-weighted ``clip_ratio/*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.off_policy_mask import sequence_mean
from gradlens.losses.registry import register


def log_sequence_ratio(inputs: TokenInputs) -> Tensor:
    """[N] log s_i = mean over valid tokens of ℓ − ℓ_old, differentiable in ℓ."""
    return sequence_mean(inputs.logp - inputs.old_logp, inputs.mask)


def _regions(adv: Tensor, s: Tensor, params: LossParams, mask: Tensor) -> dict[str, Tensor]:
    upper = (adv > 0) & (s > 1.0 + params.eps_high) & mask
    lower = (adv < 0) & (s < 1.0 - params.eps_low) & mask
    return {"clip_upper": upper, "clip_lower": lower}


def gspo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Sequence-level clipped surrogate, broadcast to the tokens; g_t = −Â_i·s_i·M_i."""
    m = inputs.mask
    adv_seq = sequence_mean(torch.where(m, inputs.advantages, 0.0), m)[:, None]  # [N, 1]
    s = torch.exp(log_sequence_ratio(inputs))[:, None]  # [N, 1]
    clipped = torch.clamp(s, 1.0 - params.eps_low, 1.0 + params.eps_high)
    seq_loss = torch.maximum(-adv_seq * s, -adv_seq * clipped)  # [N, 1]
    per_token = torch.where(m, seq_loss.expand_as(inputs.logp), 0.0)  # [N, T]

    sd = s.detach().expand_as(inputs.logp)
    adv = adv_seq.expand_as(inputs.logp)
    regions = _regions(adv, sd, params, m)
    regions["seq_clipped"] = regions["clip_upper"] | regions["clip_lower"]
    grad = torch.where(m & ~regions["seq_clipped"], -adv * sd, 0.0)
    return LossTerms(per_token=per_token, per_token_grad=grad, regions=regions, sequence_level=True)


def gspo_token(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Token form with the sequence ratio's value; g_t = −A_t·s_i·M_i,t."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    s_seq = torch.exp(log_sequence_ratio(inputs).detach())[:, None]  # [N, 1], sg[s_i]
    s = s_seq * torch.exp(inputs.logp - inputs.logp.detach())  # [N, T], value s_i, ∂/∂ℓ_t = s_i
    clipped = torch.clamp(s, 1.0 - params.eps_low, 1.0 + params.eps_high)
    per_token = torch.where(m, torch.maximum(-adv * s, -adv * clipped), 0.0)

    sd = s_seq.expand_as(inputs.logp)
    regions = _regions(adv, sd, params, m)
    off = regions["clip_upper"] | regions["clip_lower"]
    grad = torch.where(m & ~off, -adv * sd, 0.0)
    return LossTerms(per_token=per_token, per_token_grad=grad, regions=regions)


register(
    LossSpec(
        name="gspo",
        fn=gspo,
        formula="max(−Â_i·s_i, −Â_i·clip(s_i, 1−eps_low, 1+eps_high)) per sequence, "
        "s_i = exp(mean_t log r_t)",
        grad_formula="−Â_i·s_i·M_i on every token of sequence i (a constant within a sequence)",
        zero_when="Â_i = 0; Â_i>0 ∧ s_i>1+eps_high; Â_i<0 ∧ s_i<1−eps_low (whole sequence)",
        paper="GSPO, Qwen arXiv 2507.18071; verl `gspo`, TRL "
        "importance_sampling_level=sequence, OpenRLHF policy_loss_type=gspo",
        regions=("clip_upper", "clip_lower", "seq_clipped"),
        post_formula="M_i·s_i·|Â_i|·(1 − π_y)",
        coupling="sequence",
    )
)
register(
    LossSpec(
        name="gspo_token",
        fn=gspo_token,
        formula="max(−A_t·s_i,t, −A_t·clip(s_i,t, ·)), s_i,t = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)]",
        grad_formula="−A_t·s_i·M_i,t",
        zero_when="A_t = 0; A_t>0 ∧ s_i>1+eps_high; A_t<0 ∧ s_i<1−eps_low",
        paper="GSPO-token, Qwen arXiv 2507.18071; the form verl's `gspo` computes; TRL "
        "experimental gspo_token",
        regions=("clip_upper", "clip_lower"),
        post_formula="M·s_i·|A|·(1 − π_y)",
        coupling="sequence",
    )
)
