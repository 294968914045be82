"""SAPO: a soft sigmoid gate instead of a hard clip (Qwen, arXiv 2511.20347).

Per-token loss (minimised), with r = exp(ℓ − ℓ_old) and σ the logistic function:

    ℓ^SAPO_t = −A·f(r),   f(x) = (4/τ)·σ(τ·(x − 1)),   τ = tau_pos if A > 0 else tau_neg

Coefficient: f'(x) = 4·σ(1 − σ), and ∂r/∂ℓ = r, so

    g_t = −A·r·w(r),   w(r) = 4·σ(τ(r − 1))·(1 − σ(τ(r − 1))) ∈ (0, 1],   w(1) = 1.

On-policy (r = 1) SAPO is REINFORCE. Away from r = 1 the gate decays smoothly instead of
dropping to 0; the gradient is never exactly 0 for A ≠ 0. τ_neg is used for A ≤ 0 (trap A12).
Defaults τ_pos = 1.0, τ_neg = 1.05 (the paper, verl ``actor.yaml``, TRL
``sapo_temperature_pos/neg``).
Zero when: A = 0.

SAPO has no clip rule, so no clip fraction (verl logs ``pg_clipfrac = 0``); the mean gate
w over the tokens is reported as the metric ``sapo_gate`` (1 = no damping). verl forces
``seq-mean-token-mean`` for SAPO (trap A7); gradlens respects ``loss.aggregation``.
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ratio
from gradlens.losses.registry import register


def sapo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−A·(4/τ)·σ(τ(r − 1)) per token, g_t = −A·r·4σ(1 − σ)."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    pos = torch.full_like(adv, params.tau_pos)  # in the loss dtype: a float32 τ would not
    tau = torch.where(adv > 0, pos, params.tau_neg)  # cancel in g = −A·r·4σ(1 − σ)
    r = ratio(inputs)
    per_token = -adv * (4.0 / tau) * torch.sigmoid(tau * (r - 1.0))
    rd = r.detach()
    sig = torch.sigmoid(tau * (rd - 1.0))
    gate = 4.0 * sig * (1.0 - sig)
    return LossTerms(
        per_token=per_token,
        per_token_grad=-adv * rd * gate,
        token_metrics={"sapo_gate": torch.where(m, gate, 0.0)},
    )


register(
    LossSpec(
        name="sapo",
        fn=sapo,
        formula="−A·(4/τ)·σ(τ(r − 1)), τ = tau_pos (A>0) or tau_neg (A≤0)",
        grad_formula="−A·r·4σ(τ(r−1))·(1 − σ(τ(r−1)))",
        zero_when="A = 0 (the gate is soft: never exactly 0)",
        paper="SAPO, Qwen arXiv 2511.20347; verl `sapo`, TRL loss_type=sapo",
        post_formula="w(r)·r·|A|·(1 − π_y)",
    )
)
