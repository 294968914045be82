"""On-policy distillation as a policy gradient: the sampled-token form of the reverse KL.

Sampling y_t ~ π_θ, the reverse KL KL(π‖q) = E_{y∼π}[ℓ_t − ℓ^T_t] (ℓ^T_t = log q_t(y_t), the
teacher's log-prob of the sampled token) has the single-sample policy gradient with the
per-token advantage A_t = sg(ℓ^T_t − ℓ_t), the negative reverse-KL estimate k1 (Thinking
Machines' on-policy distillation, 2025; verl ``distillation_loss`` with
``use_policy_gradient`` and ``loss_mode: k1``: ``advantages = −(ℓ − ℓ^T)``):

Per-token loss (minimised):  −sg(ℓ^T_t − ℓ_t)·ℓ_t
Coefficient:                 g_t = ℓ_t − ℓ^T_t  (= −A_t)
Logit gradient:              g_t·(e_y − π_t), an ordinary c-form loss: REINFORCE with A_t.
Zero when:                   the student and the teacher give the sampled token the same
                             log-prob, ℓ_t = ℓ^T_t.

verl feeds this advantage to its ``vanilla`` PPO loss (ratio to π_old, clip); gradlens's ``opd``
is the on-policy form (r = 1), the distribution-level forms are in `gradlens.losses.distill`.
Without a teacher in the batch ℓ_old stands in for ℓ^T (``compare`` says so): g_t = log r_t.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def opd(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−sg(ℓ^T − ℓ)·ℓ per token, g_t = ℓ − ℓ^T."""
    teacher = inputs.teacher_logp if inputs.teacher_logp is not None else inputs.old_logp
    adv = torch.where(inputs.mask, teacher - inputs.logp.detach(), 0.0)  # A = sg(ℓ^T − ℓ)
    return LossTerms(
        per_token=-adv * inputs.logp,
        per_token_grad=-adv,
        token_metrics={"reverse_kl_k1": torch.where(inputs.mask, -adv, 0.0)},
    )


register(
    LossSpec(
        name="opd",
        fn=opd,
        formula="−sg(log q(y) − log π_θ(y))·log π_θ(y)",
        grad_formula="log π_θ(y) − log q(y)",
        zero_when="log π_θ(y) = log q(y)",
        paper="on-policy distillation (Thinking Machines 2025; Gu et al. 2024 MiniLLM); verl "
        "distillation use_policy_gradient, loss_mode k1",
        post_formula="|ℓ − ℓ^T|·(1 − π_y)",
        uses_advantage=False,
        needs=("teacher_logp",),
    )
)
