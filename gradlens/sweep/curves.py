"""The closed-form gradient of every selected loss at every point of the grid.

No loss is special-cased: each registered `LossSpec.fn` is called once per variant on a
`TokenInputs` that holds all the points, and its own coefficient g = ∂(per-token loss)/∂ℓ
does the rest (losses.md §0). For one token with π_θ = π_θ(y):

    ℓ = log π_θ,  ℓ_old = log π_old,  A = ±|A|,  mask True
    c = a·g                                  a: the aggregation weight of the token
    ∂L/∂z_y           = c·(1 − π_θ)           the sampled row
    Σ_{j≠y} |∂L/∂z_j| = |c|·(1 − π_θ)         the other rows get −c·π_j, and Σ_{j≠y} π_j = 1 − π_θ
    amplification     = |g| / |A|            the sampled-row gradient over REINFORCE's,
                                             a·|A|·(1 − π_θ), at the same point

Layout. Each point is a token alone in its own sequence, so the [N, T] grid the loss sees is
[2P, 1]: the P points at A = +|A|, then the same P points at A = −|A|. (This departs from
laying the points out as one sequence, [1, P]: sequence-level rules — DeepSeek-V3.2's OPSM
averages the drift over a sequence — and the aggregation's 1/N_tok would then mix points that
have nothing to do with each other.) The weight a is that of a one-token sequence, from
`aggregation_weights` itself: 1 for every mode except ``token_sum_norm`` and
``seq_mean_token_sum_norm`` with ``loss_scale_factor`` L, which give 1/L — so
``--over loss.aggregation=...`` compares what a normaliser does to a single token.

Everything is float64: the unclipped PPO gradient spans ten decades over the default sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.losses import aggregation_weights, get_loss
from gradlens.sweep.config import Variant
from gradlens.sweep.grid import Grid

SIGNS = (1.0, -1.0)  # A = +|A| (a rewarded token), then A = −|A| (a penalised one)

Progress = Callable[[int, int], None]  # (units done, units in all)


@dataclass(frozen=True)
class Curve:
    """One loss, one variant, one sign of A, over all P points of the grid.

    Attributes:
        loss: registry name.
        variant: the ``over`` combination (``"default"`` without one).
        advantage: A, with its sign.
        uses_advantage: False for losses that ignore A (sft): no amplification.
        weight: aggregation weight a of a lone token.
        ratio: [P] r = π_θ(y)/π_old(y).
        coefficient: [P] c = a·g = ∂L/∂ℓ.
        grad_sampled: [P] ∂L/∂z_y = c·(1 − π_θ(y)), signed (negative pushes z_y up).
        grad_other_mass: [P] Σ_{j≠y} |∂L/∂z_j| = |c|·(1 − π_θ(y)).
        amplification: [P] |g|/|A|; NaN where the loss does not use A.
        regions: rule name → [P] bool, where the loss's own rule fired (clip, mask, ...).
    """

    loss: str
    variant: Variant
    advantage: float
    uses_advantage: bool
    weight: float
    ratio: Tensor
    coefficient: Tensor
    grad_sampled: Tensor
    grad_other_mass: Tensor
    amplification: Tensor
    regions: dict[str, Tensor]

    @property
    def zero(self) -> Tensor:
        """[P] bool: the sampled-row gradient is exactly 0 (a rule, A = 0 or π_θ = 1)."""
        return self.grad_sampled == 0

    @property
    def fired(self) -> Tensor:
        """[P] bool: some rule of the loss fired at the point."""
        out = torch.zeros_like(self.ratio, dtype=torch.bool)
        for mask in self.regions.values():
            out = out | mask
        return out

    def rules_at(self, index: int) -> list[str]:
        return [name for name, mask in self.regions.items() if bool(mask[index])]

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.loss, self.variant.label, self.advantage)


def lone_token_weight(mode: str, loss_scale_factor: float | None) -> float:
    """The aggregation weight a of a sequence made of one valid token."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    return float(aggregation_weights(mask, mode, loss_scale_factor)[0, 0])


def point_inputs(pi_old: Tensor, pi_theta: Tensor, magnitude: float) -> TokenInputs:
    """[2P, 1] loss inputs: the points at A = +|A|, then at A = −|A|."""
    logp = torch.log(pi_theta).repeat(len(SIGNS))[:, None]  # [2P, 1]
    old_logp = torch.log(pi_old).repeat(len(SIGNS))[:, None]  # [2P, 1]
    signs = torch.tensor(SIGNS, dtype=torch.float64).repeat_interleave(pi_old.numel())
    advantages = (magnitude * signs)[:, None]  # [2P, 1]
    mask = torch.ones_like(logp, dtype=torch.bool)
    return TokenInputs(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)


def variant_curves(grid: Grid, variant: Variant, name: str) -> list[Curve]:
    """The curves of loss ``name`` in ``variant``: one per sign of A."""
    config = variant.config
    spec = get_loss(name)
    weight = lone_token_weight(config.loss.aggregation, config.loss.loss_scale_factor)
    inputs = point_inputs(grid.pi_old, grid.pi_theta, config.advantage)
    with torch.no_grad():
        terms = spec.terms(inputs, config.loss.params(), config.loss.token_aggregation())
    g = terms.per_token_grad.to(torch.float64)[:, 0]  # [2P]
    adv = inputs.advantages[:, 0]  # [2P]
    ratio = torch.exp(inputs.logp - inputs.old_logp)[:, 0]  # [2P]
    one_minus = (1.0 - grid.pi_theta).repeat(len(SIGNS))  # [2P]
    c = weight * g
    nan = torch.full_like(g, float("nan"))
    amplification = g.abs() / adv.abs() if spec.uses_advantage else nan  # [2P]
    curves = []
    size = grid.size
    for k, sign in enumerate(SIGNS):
        part = slice(k * size, (k + 1) * size)
        curves.append(
            Curve(
                loss=name,
                variant=variant,
                advantage=sign * config.advantage,
                uses_advantage=spec.uses_advantage,
                weight=weight,
                ratio=ratio[part],
                coefficient=c[part],
                grad_sampled=c[part] * one_minus[part],
                grad_other_mass=c[part].abs() * one_minus[part],
                amplification=amplification[part],
                regions={r: m[:, 0][part].clone() for r, m in terms.regions.items()},
            )
        )
    return curves


def sweep_curves(
    grid: Grid, variants: list[Variant], names: list[str], progress: Progress | None = None
) -> list[Curve]:
    """Every curve, ordered by loss (in the order named), then variant, then sign of A."""
    total = len(variants) * len(names)
    curves: list[Curve] = []
    for v, variant in enumerate(variants):
        for i, name in enumerate(names):
            curves.extend(variant_curves(grid, variant, name))
            if progress is not None:
                progress(v * len(names) + i + 1, total)
    order = {name: i for i, name in enumerate(names)}
    labels = {variant.label: i for i, variant in enumerate(variants)}
    curves.sort(key=lambda c: (order[c.loss], labels[c.variant.label], -c.advantage))
    return curves
