"""REAL: policy optimisation as classification within each prompt group (arXiv 2602.05630), as
ms-swift's ``loss_type="real"`` computes it (``swift/rlhf_trainers/grpo_trainer.py``, 3602360;
docs ``GRPO/AdvancedResearch/REAL.md``).

Each sequence k gets a score, its mean log-ratio s̄_k = (1/|o_k|) Σ_t (ℓ_t − ℓ_old,t) (the log of
GSPO's s_k). Within a prompt group, the sequences with Â_k > 0 form O⁺ and those with Â_k ≤ 0
form O⁻ (A = 0 counts as negative, as in ms-swift); the loss pushes O⁺ scores up and O⁻ scores
down through two log-sum-exp "classification" terms with temperature τ = ``loss.real_tau`` (0.5):

    L_g = log(1 + Σ_{k∈O⁻} e^{s̄_k/τ}) + log(1 + Σ_{k∈O⁺} e^{−s̄_k/τ})
    L   = (1/G) Σ_g L_g     over the groups with an O⁺ and an O⁻ member; G counts every group

    ∂L/∂ℓ_t = (1/G)·(1/|o_k|)·∂L_g/∂s̄_k  for t in sequence k:
        k ∈ O⁻:  +(1/τ)·e^{s̄_k/τ}/(1 + Σ_{O⁻} e^{s̄/τ})
        k ∈ O⁺:  −(1/τ)·e^{−s̄_k/τ}/(1 + Σ_{O⁺} e^{−s̄/τ})

The coefficient of a token depends on every sequence of its group (coupling ``group``): it is
bounded by 1/(τ·G·|o_k|) and monotone in the scores, never zero inside a mixed group. Only the
sign of Â enters, not its size.
Zero when: the group has no O⁺ or no O⁻ member (region ``seq_group_skipped``).

REAL aggregates itself (`LossTerms.self_aggregated`: the ``1/G`` and ``1/|o_k|`` above are the
loss's own; ms-swift ignores the run's normalisation for it): ``loss.aggregation`` does not
apply, and neither do ``loss.corrections`` or the top-entropy selection, which ms-swift applies
to a per-token loss that is zero for REAL. Each token carries its group's share
L_g/(G·N_g) as its per-token value (N_g: the group's valid tokens), so the per-token values sum
to L. The groups come from the source (``Batch.groups``): the synthetic and model sources
know them (``group_size``), a literal sequence states ``group``, a batch file needs
``source.group_size``, `gradlens.diagnose` takes ``groups``; without them the loss stops with
an error. A sequence without valid tokens takes no part.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.off_policy_mask import sequence_mean
from gradlens.losses.registry import register


def _log_one_plus_sum_exp(x: Tensor) -> Tensor:
    """log(1 + Σ e^x) over a 1-D tensor (0 for an empty one)."""
    return torch.logsumexp(torch.cat([x, x.new_zeros(1)]), dim=0)


def real(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """Group classification on the sequence scores s̄_k; aggregates itself (1/G)."""
    if inputs.groups is None:
        raise GradlensError(
            "loss real is group-coupled and needs each sequence's prompt group, which this batch "
            "does not have: the synthetic and model sources set it from source.group_size; a "
            "batch file needs source.group_size; literal sequences state group: <id>; "
            "gradlens.diagnose takes groups=[N] ids"
        )
    m = inputs.mask
    tau = params.real_tau
    present = m.any(-1)  # [N]
    score = sequence_mean(inputs.logp - inputs.old_logp, m)  # [N] s̄_k, differentiable
    sd = score.detach()
    adv = sequence_mean(torch.where(m, inputs.advantages, 0.0), m)  # [N] Â_k
    pos, neg = present & (adv > 0), present & (adv <= 0)
    lengths = m.sum(-1).to(sd.dtype).clamp(min=1)  # [N]
    ids = torch.unique(inputs.groups)
    num_groups = ids.numel()
    # [N] L_g/(G·N_g)·|o_k| on each member k; 0·score keeps the graph when every group is
    # skipped (ms-swift does the same), so the loss stays differentiable, with gradient 0
    per_seq_loss = 0.0 * score
    grad_seq = torch.zeros_like(sd)  # [N] ∂L/∂s̄_k
    skipped = torch.zeros_like(present)
    for gid in ids.tolist():
        member = inputs.groups == gid  # [N]
        gpos, gneg = member & pos, member & neg
        if not (bool(gpos.any()) and bool(gneg.any())):
            skipped |= member
            continue
        x_neg, x_pos = score[gneg] / tau, -score[gpos] / tau
        loss_g = _log_one_plus_sum_exp(x_neg) + _log_one_plus_sum_exp(x_pos)
        tokens_g = lengths[member & present].sum()
        per_seq_loss = per_seq_loss + torch.where(
            member & present, loss_g / (num_groups * tokens_g) * lengths, 0.0
        )
        xd_neg, xd_pos = x_neg.detach(), x_pos.detach()
        grad_seq[gneg] = torch.exp(xd_neg - _log_one_plus_sum_exp(xd_neg)) / tau
        grad_seq[gpos] = -torch.exp(xd_pos - _log_one_plus_sum_exp(xd_pos)) / tau
    per_token = torch.where(m, (per_seq_loss / lengths)[:, None].expand_as(inputs.logp), 0.0)
    c_seq = grad_seq / (num_groups * lengths)  # [N]
    coefficient = torch.where(m, c_seq[:, None].expand_as(inputs.logp), 0.0)
    return LossTerms(
        per_token=per_token,
        per_token_grad=coefficient,
        regions={"seq_group_skipped": skipped[:, None] & m},
        self_aggregated=True,
    )


register(
    LossSpec(
        name="real",
        fn=real,
        formula="(1/G)·Σ_g [log(1 + Σ_{O⁻} e^{s̄_k/τ}) + log(1 + Σ_{O⁺} e^{−s̄_k/τ})], "
        "s̄_k = mean_t log r",
        grad_formula="(1/(G·|o_k|))·(+1/τ)·e^{s̄_k/τ}/(1 + Σ_{O⁻} e^{s̄/τ}) for O⁻; "
        "−(1/τ)·e^{−s̄_k/τ}/(1 + Σ_{O⁺} e^{−s̄/τ}) for O⁺",
        zero_when="the group lacks an O⁺ (Â > 0) or an O⁻ (Â ≤ 0) sequence",
        paper="REAL arXiv 2602.05630; ms-swift loss_type=real (aggregates itself, 1/G)",
        regions=("seq_group_skipped",),
        post_formula="|c|·(1 − π_y) (REAL aggregates itself: c is the coefficient)",
        needs=("groups",),
        coupling="group",
        correction_note="real aggregates itself from sequence scores; ms-swift's per-token IS "
        "weights multiply a zero per-token loss there, so they do nothing either",
    )
)
