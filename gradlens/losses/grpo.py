"""GRPO: the clipped PPO surrogate plus a KL penalty to a reference policy.

Paper: DeepSeekMath (Shao et al., arXiv 2402.03300), eq. 3; β = 0.04 there. The unbiased KL
is DeepSeek-V3.2's (arXiv 2512.02556, §3.1, eq. 7). The estimators are from J. Schulman,
"Approximating KL divergence" (joschu.net/blog/kl-approx.html).

Per-token loss (minimised), with u = ℓ_ref − ℓ and r = exp(ℓ − ℓ_old):

    ℓ^GRPO_t = ℓ^ppo_clip_t + β·D_t

    estimator   D_t                       ∂D/∂ℓ              E_{y~π_θ} of the gradient
    k1          ℓ − ℓ_ref                 1                  0: the penalty's gradient is noise
    k2          ½(ℓ − ℓ_ref)²             ℓ − ℓ_ref          ∇KL(π_θ‖π_ref)
    k3          e^u − u − 1               1 − e^u            ∇KL(π_ref‖π_θ), the forward KL (A10)
    unbiased    r·(e^u − u − 1)           r·(ℓ − ℓ_ref)      ∇KL(π_θ‖π_ref) with y ~ π_old

Coefficient:  g_t = −A·r·M (× M_seq with opsm_delta, as ``ppo_clip``) + β·∂D/∂ℓ.
Zero when:    the PPO part is zero (A = 0, M = 0, M_seq = 0) and ∂D/∂ℓ = 0: k2, k3 and
              unbiased at ℓ = ℓ_ref; k1 never (its gradient is the constant β).

k3 is verl's ``low_var_kl`` (also slime's ``low_var_kl`` and TRL's only estimator). The ratio in
``unbiased`` is *not* detached (trap A9): a detached ratio would give r·(1 − π_ref/π_θ), biased.
Like every framework, the KL is neither masked by the clip nor weighted by a training–inference
correction (`LossTerms.penalty`). No clamp is applied (verl clamps k3 to ±10, OpenRLHF clamps
every estimator): gradlens shows what the estimator does.

Reference policy: ℓ_ref comes from the source (synthetic ``source.ref_drift``, literal
``ref_prob``/``ref_logp``). Without one, π_old stands in for π_ref and ``compare`` says so.

Design note: the penalty is a setting of this loss (``loss.kl_estimator``, ``loss.kl_coef``),
not a term added to every loss, so that the defaults of every other loss stay penalty-free and
the name ``grpo`` means one objective. A KL on another surrogate is a user loss away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError, unknown_name_message
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.ppo import ppo_clip
from gradlens.losses.registry import register

# (value D, closed-form ∂D/∂ℓ) from (ℓ, ℓ_ref, ℓ_old); ℓ may require grad, the rest are constants.
Estimator = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def k1(logp: Tensor, ref: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    return logp - ref, torch.ones_like(logp.detach())


def k2(logp: Tensor, ref: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    d = logp - ref
    return 0.5 * d * d, d.detach()


def k3(logp: Tensor, ref: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    u = ref - logp
    return torch.exp(u) - u - 1.0, 1.0 - torch.exp(u.detach())


def unbiased(logp: Tensor, ref: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.exp(logp - old)  # differentiable: the gradient flows through the ratio (A9)
    u = ref - logp
    rd = r.detach()
    return r * (torch.exp(u) - u - 1.0), rd * (logp.detach() - ref)


KL_ESTIMATORS: dict[str, Estimator] = {"k1": k1, "k2": k2, "k3": k3, "unbiased": unbiased}


def kl_penalty(inputs: TokenInputs, params: LossParams) -> tuple[Tensor, Tensor]:
    """[N, T] D_t and ∂D/∂ℓ of ``params.kl_estimator`` (0 at masked positions)."""
    try:
        estimator = KL_ESTIMATORS[params.kl_estimator]
    except KeyError:
        raise GradlensError(
            unknown_name_message("KL estimator", params.kl_estimator, list(KL_ESTIMATORS))
        ) from None
    ref = inputs.ref_logp if inputs.ref_logp is not None else inputs.old_logp
    value, grad = estimator(inputs.logp, ref, inputs.old_logp)
    return torch.where(inputs.mask, value, 0.0), torch.where(inputs.mask, grad, 0.0)


def grpo(inputs: TokenInputs, params: LossParams) -> LossTerms:
    """``ppo_clip`` plus β·D_t; g_t = ppo_clip's g_t + β·∂D/∂ℓ."""
    base = ppo_clip(inputs, params)
    value, grad = kl_penalty(inputs, params)
    penalty, penalty_grad = params.kl_coef * value, params.kl_coef * grad
    return LossTerms(
        per_token=base.per_token + penalty,
        per_token_grad=base.per_token_grad + penalty_grad,
        regions=base.regions,
        penalty=penalty,
        penalty_grad=penalty_grad,
        token_metrics={"kl": value.detach()},
    )


register(
    LossSpec(
        name="grpo",
        fn=grpo,
        formula="ppo_clip + β·D(π_θ‖π_ref), D = k1 | k2 | k3 | unbiased (loss.kl_estimator)",
        grad_formula="−A·r·M + β·∂D/∂ℓ  (k1: β; k2: β(ℓ−ℓ_ref); k3: β(1−π_ref/π_θ); "
        "unbiased: β·r·(ℓ−ℓ_ref))",
        zero_when="PPO part zero (A = 0, M = 0) and ∂D/∂ℓ = 0 (ℓ = ℓ_ref; never for k1)",
        paper="GRPO: DeepSeekMath arXiv 2402.03300 eq. 3; unbiased KL: DeepSeek-V3.2 "
        "arXiv 2512.02556 eq. 7; estimators: Schulman, joschu.net/blog/kl-approx.html",
        regions=("clip_upper", "clip_lower", "clip_dual", "seq_masked"),
        post_formula="|g|·(1 − π_y), g = PPO part + β·∂D/∂ℓ",
        needs=("ref_logp",),
    )
)
