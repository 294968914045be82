"""DRO / Kimi-1.5: a quadratic log-ratio penalty instead of a clip (Kimi k1.5, arXiv 2501.12599,
eq. 3; verl ``dro``, docs/algo/dro.md; ROLL ``kimi15``).

    per-token loss  −A·log π_θ(y) + (β/2)·(ℓ − ℓ_old)²        g = −A + β·(ℓ − ℓ_old)

β = ``loss.dro_beta`` (ROLL's ``kimi15_tau`` default 0.1; verl's ``dro_beta`` has no default and
must be set positive). On-policy (ℓ = ℓ_old) DRO is REINFORCE; off-policy the penalty pulls ℓ back
towards ℓ_old with a force linear in the log-ratio, never switching a token off and never
exploding (compare PPO's r, which is exponential in it).
Zero when: A = β·(ℓ − ℓ_old).

The penalty belongs to the policy term here (verl multiplies the whole per-token loss by its
rollout IS weights), so ``loss.corrections`` weight it too. DRO expects advantages built for its
soft off-policy objective (the paper's mean-centred rewards; the caller's choice).
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import register


def dro(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·ℓ + (β/2)(ℓ − ℓ_old)² per token, g = −A + β(ℓ − ℓ_old)."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    log_r = inputs.logp - inputs.old_logp
    beta = params.dro_beta
    per_token = torch.where(m, -adv * inputs.logp + 0.5 * beta * log_r * log_r, 0.0)
    grad = torch.where(m, -adv + beta * log_r.detach(), 0.0)
    return LossTerms(per_token=per_token, per_token_grad=grad)


register(
    LossSpec(
        name="dro",
        fn=dro,
        formula="−A·log π_θ(y) + (β/2)·(ℓ − ℓ_old)²",
        grad_formula="−A + β·(ℓ − ℓ_old)",
        zero_when="A = β·(ℓ − ℓ_old) (on-policy: A = 0)",
        paper="Kimi k1.5 arXiv 2501.12599 eq. 3; verl `dro` (dro_beta), ROLL kimi15 (kimi15_tau)",
        post_formula="|A − β·log r|·(1 − π_y)",
    )
)
