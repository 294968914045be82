"""The rollout's sampling support at a sweep point: a top-p/top-k kept set, replayed or not.

When the rollout samples with top-p or top-k, y_t is drawn from the policy restricted to a kept
set K_t and renormalised (docs/mismatch.md). A sweep point has no vocabulary, so the kept set
enters through two numbers (the ``support`` section of the sweep config):

    S_θ   = Σ_{v∈K_t} π_θ(v)      ``support.kept_mass``       π_θ's mass of K_t (1: no top-p/top-k)
    S_old = Σ_{v∈K_t} π_old(v)    ``support.old_kept_mass``   π_old's (null: the same as S_θ)

and by what the stored old log-prob is (``support.old_logp``): ``full``, log π_old(y) of the
whole vocabulary (a training pass recomputed it), or ``kept``, log π̃_old(y) = log π_old(y) −
log S_old (the inference engine's processed log-probs: the probability y was really drawn
with; docs/mismatch.md's sampler ratio). The swept π_old(y) and π_θ(y) are always the
whole-vocabulary probabilities, and y lies in K_t, so π_θ(y) ≤ S_θ and π_old(y) ≤ S_old.

What the loss reads (r = π_θ(y)/π_old(y) the ratio of the swept values):

    loss.sampling_support   ℓ                        ℓ_old                    ratio the loss sees
    full, old_logp full     log π_θ(y)               log π_old(y)             r
    full, old_logp kept     log π_θ(y)               log π_old(y) − log S_old r·S_old
    kept (either)           log π_θ(y) − log S_θ     log π_old(y) − log S_old r̃ = r·S_old/S_θ

Replay (``kept``) restricts both sides to K_t, so the ratio is π̃_θ/π̃_old = r·S_old/S_θ: when
S_old = S_θ replay leaves it unchanged. Without replay only the stored side may be renormalised
(old_logp kept): the ratio is then multiplied by S_old, at every point — at S = 0.17 an
on-policy token (r = 1) is seen at 0.17, below any 1 − ε_low, and clipped for A < 0.

The logit gradient is c·(e_y − p) with c = ∂L/∂ℓ computed by the loss from the ℓ and ℓ_old
above, and p the distribution whose log the loss differentiates:

    full   p = π_θ:   ∂L/∂z_y = c·(1 − π_θ(y)),  every other row −c·π_θ(v)
    kept   p = π̃_θ:   ∂L/∂z_y = c·(1 − π_θ(y)/S_θ),  kept rows −c·π̃_θ(v),  rows outside K_t
                      exactly 0

and in both cases Σ_{v≠y} |∂L/∂z_v| = |c|·(1 − p(y)): the row still sums to zero.

The autograd check (`gradlens.sweep.check`) writes the point out as an explicit distribution
over V = ``check.vocab_size`` tokens (`explicit_probs`): y = token 0 with π_θ(y); when S_θ < 1
the kept set is the first V // 2 tokens, whose other members share S_θ − π_θ(y), and the other
V − V // 2 tokens share 1 − S_θ; when S_θ = 1 every token is kept and the V − 1 others share
1 − π_θ(y). Replay differentiates z_y − logsumexp(z over K_t), which depends on the kept logits
only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

OLD_LOGP = ("full", "kept")


@dataclass(frozen=True)
class PointSupport:
    """The kept set of a sweep point, as the loss sees it.

    Attributes:
        kept_mass: S_θ, π_θ's mass of K_t, in (0, 1].
        old_kept_mass: S_old, π_old's mass of K_t, in (0, 1].
        old_logp: ``full`` (ℓ_old = log π_old(y)) or ``kept`` (log π̃_old(y)).
        replayed: ``loss.sampling_support`` is ``kept``: the loss uses π̃_θ and π̃_old.
    """

    kept_mass: float = 1.0
    old_kept_mass: float = 1.0
    old_logp: str = "full"
    replayed: bool = False


def loss_log_probs(
    pi_old: Tensor, pi_theta: Tensor, support: PointSupport
) -> tuple[Tensor, Tensor]:
    """(ℓ, ℓ_old) the loss reads at each point (the module docstring's table), float64."""
    logp = torch.log(pi_theta)
    old_logp = torch.log(pi_old)
    if support.replayed or support.old_logp == "kept":
        old_logp = old_logp - math.log(support.old_kept_mass)
    if support.replayed:
        logp = logp - math.log(support.kept_mass)
    return logp, old_logp


def trained_prob(pi_theta: Tensor, support: PointSupport) -> Tensor:
    """[P] p(y): π_θ(y), or π̃_θ(y) = π_θ(y)/S_θ when the support is replayed."""
    return pi_theta / support.kept_mass if support.replayed else pi_theta


def kept_count(kept_mass: float, vocab_size: int) -> int:
    """|K_t| of the explicit distribution: every token when S_θ = 1, else the first V // 2."""
    return vocab_size if kept_mass == 1.0 else vocab_size // 2


def explicit_probs(pi_theta: Tensor, kept_mass: float, vocab_size: int) -> Tensor:
    """[K, V] π_θ of the explicit distribution (module docstring): y = token 0 with π_θ(y), the
    other kept tokens sharing S_θ − π_θ(y), the tokens outside K_t sharing 1 − S_θ."""
    kept = kept_count(kept_mass, vocab_size)
    probs = ((kept_mass - pi_theta) / (kept - 1))[:, None].repeat(1, vocab_size)  # [K, V]
    probs[:, 0] = pi_theta
    if kept < vocab_size:
        probs[:, kept:] = (1.0 - kept_mass) / (vocab_size - kept)
    return probs


def explicit_entropy(pi_theta: Tensor, support: PointSupport, vocab_size: int) -> Tensor:
    """[K] H of the distribution the loss reads: π_θ of `explicit_probs`, or π̃_θ (π_θ on K_t
    over S_θ, 0 outside) when replayed; written per group of equal entries."""
    kept = kept_count(support.kept_mass, vocab_size)
    scale = support.kept_mass if support.replayed else 1.0
    p_y = pi_theta / scale
    other = (support.kept_mass - pi_theta) / (kept - 1) / scale
    h = -torch.xlogy(p_y, p_y) - (kept - 1) * torch.xlogy(other, other)
    if kept < vocab_size and not support.replayed:
        rest = torch.tensor((1.0 - support.kept_mass) / (vocab_size - kept), dtype=torch.float64)
        h = h - (vocab_size - kept) * torch.xlogy(rest, rest)
    return h


def feasibility_problems(
    pi_old_max: float, pi_theta_max: float, kept_mass: float, old_kept_mass: float
) -> list[str]:
    """Why the swept probabilities cannot come from a kept set of these masses (y lies in K_t,
    so π(y) ≤ S), in words; empty when they can."""
    problems = []
    if pi_theta_max > kept_mass:
        problems.append(
            f"support.kept_mass = {kept_mass:g} but π_θ(y) reaches {pi_theta_max:g}; the sampled "
            f"token lies in its kept set, so π_θ(y) ≤ S_θ: keep π_θ(y) at or below {kept_mass:g} "
            "(--pi-theta, or --max with --vary pi_theta) or raise support.kept_mass"
        )
    if pi_old_max > old_kept_mass:
        problems.append(
            f"S_old = {old_kept_mass:g} (support.old_kept_mass, or support.kept_mass when it is "
            f"null) but π_old(y) reaches "
            f"{pi_old_max:g}; the sampled token lies in its kept set, so π_old(y) ≤ S_old: keep "
            f"π_old(y) at or below {old_kept_mass:g} (--max, or --pi-old with --vary pi_theta) "
            "or raise the kept mass"
        )
    return problems
