"""VESPO (arXiv 2602.10693): a detached gamma-shaped weight of the whole sequence's importance
ratio, as TRL's ``loss_type="vespo"`` computes it (``GRPOTrainer.get_gamma_weights``, f2cd577;
also Liger's chunked GRPO loss).

The sequence weight is the *product* of the token ratios (not GSPO's geometric mean), with the
training–inference ratio ρ_t = π_old(y_t)/μ(y_t) folded in when the batch has rollout log-probs:

    log W_i = Σ_t (ℓ_t − ℓ_old,t) + Σ_t (ℓ_old,t − ℓ_μ,t)          (= Σ_t log(π_θ/μ))
    φ(W)    = W^k·e^{λ(1 − W)} = exp(λ + k·log W − λ·W)           φ(1) = 1, φ(0) = φ(∞) = 0
    (k, λ)  = (vespo_k_pos, vespo_lambda_pos) = (2, 3) if Â_i ≥ 0, (vespo_k_neg, vespo_lambda_neg)
              = (3, 2) if Â_i < 0

    per-token loss  −sg[φ(W_i)]·A_t·log π_θ(y_t)          g = −A_t·φ(W_i)

φ rises from 0 to its maximum at W = k/λ (2/3 for A ≥ 0: φ = 1.2081; 3/2 for A < 0: φ = 1.2416)
and falls back to 0: a sequence far off-policy in either direction gets no gradient. The weight
is detached, so the gradient of a token depends on the other tokens of its sequence only through
φ (coupling ``sequence``). The mean φ is reported as ``metrics.vespo_phi`` (TRL
``vespo/phi_seq_mean`` under ``seq_mean_token_mean``).
Zero when: A = 0, or φ underflows (W → 0 or W → ∞).

Traps. TRL folds the vLLM importance ratio into W and therefore skips its usual per-token IS
multiplication for ``vespo``: composing ``loss.corrections`` here counts ρ twice. TRL's ρ is
its already truncated/masked ``importance_sampling_ratio``; gradlens folds in the raw ρ (add a
correction's truncation to compare). TRL clamps each log r to ±20 and log ρ and log W to
[ln 1e-8, 20]; gradlens does not clamp (φ is already 0 where those clamps bind, except a
sequence with W < 1e-8). TRL aggregates ``vespo`` by the global token count (``token_mean``).
"""

from __future__ import annotations

import torch

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.off_policy_mask import sequence_mean
from gradlens.losses.registry import register


def vespo_weight(inputs: TokenInputs, params: LossParams) -> torch.Tensor:
    """[N, T] φ(W_i) on every token of sequence i (0 at masked positions), detached."""
    m = inputs.mask
    mu = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    log_w = torch.where(m, inputs.logp.detach() - mu, 0.0).sum(-1, keepdim=True)  # [N, 1]
    adv_seq = sequence_mean(torch.where(m, inputs.advantages, 0.0), m)[:, None]  # [N, 1]
    nonneg = adv_seq >= 0
    k = torch.where(nonneg, torch.full_like(log_w, params.vespo_k_pos), params.vespo_k_neg)
    lam = torch.where(
        nonneg, torch.full_like(log_w, params.vespo_lambda_pos), params.vespo_lambda_neg
    )
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))  # [N, 1]
    return torch.where(m, phi.expand_as(inputs.logp), 0.0)


def vespo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """−sg[φ(W_i)]·A·ℓ per token, g = −A·φ(W_i)."""
    m = inputs.mask
    adv = torch.where(m, inputs.advantages, 0.0)
    phi = vespo_weight(inputs, params)
    g = -adv * phi
    return LossTerms(per_token=g * inputs.logp, per_token_grad=g, token_metrics={"vespo_phi": phi})


register(
    LossSpec(
        name="vespo",
        fn=vespo,
        formula="−sg[φ(W_i)]·A·log π_θ(y), W_i = Π_t π_θ/μ over the sequence, "
        "φ(W) = W^k·e^{λ(1−W)}, (k, λ) by the sign of Â_i",
        grad_formula="−A·φ(W_i)",
        zero_when="A = 0; φ underflows (W → 0 or ∞)",
        paper="VESPO arXiv 2602.10693; TRL loss_type=vespo (get_gamma_weights), Liger GRPO",
        post_formula="φ(W_i)·|A|·(1 − π_y)",
        needs=("rollout_logp",),
        coupling="sequence",
        correction_note="VESPO already folds ρ = π_old/μ into its sequence weight W (TRL skips "
        "its per-token IS weight for vespo), so a correction counts it twice",
    )
)
