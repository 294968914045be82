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
``--over loss.aggregation=...`` compares what a normaliser does to a single token. A loss that
aggregates itself (``real``) has weight 1.

Coupling (`LossSpec.coupling`). A ``token`` or ``sequence`` loss sees all the points at once:
each point is its own sequence, so nothing couples them. The others would couple points that
have nothing to do with each other, so they are called once per point: a ``group`` loss
(``real``) on the point's two tokens, A = +|A| and A = −|A|, as one prompt group (one member
on each side of REAL's classification, with the same score); a ``batch`` loss (``clip_cov``,
``kl_cov``, ``m2po``) on each token alone as a batch of one. That is what those losses do to a
lone token, not what they do inside a real batch: the covariance of a lone token is 0, so
Clip-Cov selects nothing (its curve is ``ppo_clip``'s) and KL-Cov selects the token (its curve
carries the penalty everywhere); M2PO never masks the only token of a batch. A function that
aggregates itself (a loss you wrote, a framework's) is called on each token alone too: on all
the points at once, its own token mean would divide each point's gradient by the number of
points (1/36 on the default grid), where a built-in loss's weight a is that of a lone token.

The rollout's kept set (``support`` and ``loss.sampling_support``, `gradlens.sweep.support`):
ℓ and ℓ_old are shifted by the kept masses as that module's table says, so the loss computes
its ratio and clip decision from them, and on a replayed support 1 − π_θ(y) above becomes
1 − π̃_θ(y) = 1 − π_θ(y)/S_θ (`Curve.pi_sampled`). With the default kept mass 1 nothing moves.

Per-token entropy (``aspo``'s widths): the entropy of the check's explicit distribution
(`gradlens.sweep.support.explicit_entropy`: the sampled token at π_θ(y), the rest shared as
the kept set says; π̃_θ's when replayed). A lone
token is never above its own sequence's entropy quantile, so ``aspo`` draws its narrow width.
``loss.corrections``, ``loss.entropy_coef`` and ``loss.top_entropy_quantile`` act outside the
loss functions and are not drawn (a point has no rollout policy, and no batch to take a
quantile over).

Everything is float64: the unclipped PPO gradient spans ten decades over the default sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses import Aggregation, LossParams, LossSpec, aggregation_weights, get_loss
from gradlens.sweep.config import Variant
from gradlens.sweep.grid import Grid
from gradlens.sweep.support import PointSupport, explicit_entropy, loss_log_probs, trained_prob

SIGNS = (1.0, -1.0)  # A = +|A| (a rewarded token), then A = −|A| (a penalised one)

Progress = Callable[[int, int], None]  # (units done, units in all)
FULL = PointSupport()  # no kept set: the whole vocabulary


@dataclass(frozen=True)
class Curve:
    """One loss, one variant, one sign of A, over all P points of the grid.

    Attributes:
        loss: registry name.
        variant: the ``over`` combination (``"default"`` without one).
        advantage: A, with its sign.
        uses_advantage: False for losses that ignore A (sft): no amplification.
        weight: aggregation weight a of a lone token.
        ratio: [P] the ratio the loss saw, exp(ℓ − ℓ_old): r = π_θ(y)/π_old(y), or as the
            kept set changes it (`gradlens.sweep.support`).
        pi_sampled: [P] p(y), the probability of y in the softmax the loss differentiates:
            π_θ(y), or π̃_θ(y) = π_θ(y)/S_θ on a replayed kept set.
        coefficient: [P] c = a·g = ∂L/∂ℓ.
        grad_sampled: [P] ∂L/∂z_y = c·(1 − p(y)), signed (negative pushes z_y up).
        grad_other_mass: [P] Σ_{j≠y} |∂L/∂z_j| = |c|·(1 − p(y)).
        amplification: [P] |g|/|A|; NaN where the loss does not use A.
        regions: rule name → [P] bool, where the loss's own rule fired (clip, mask, ...).
    """

    loss: str
    variant: Variant
    advantage: float
    uses_advantage: bool
    weight: float
    ratio: Tensor
    pi_sampled: Tensor
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
    """The aggregation weight a of a sequence made of one valid token (its own prompt group)."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    groups = torch.zeros(1, dtype=torch.int64)
    return float(aggregation_weights(mask, mode, loss_scale_factor, groups=groups)[0, 0])


def point_inputs(
    pi_old: Tensor,
    pi_theta: Tensor,
    magnitude: float,
    vocab_size: int = 8,
    support: PointSupport = FULL,
) -> TokenInputs:
    """[2P, 1] loss inputs: the points at A = +|A|, then at A = −|A|; ℓ and ℓ_old as the kept
    set ``support`` makes them (`gradlens.sweep.support.loss_log_probs`)."""
    logp_1d, old_logp_1d = loss_log_probs(pi_old, pi_theta, support)  # [P] each
    logp = logp_1d.repeat(len(SIGNS))[:, None]  # [2P, 1]
    old_logp = old_logp_1d.repeat(len(SIGNS))[:, None]  # [2P, 1]
    signs = torch.tensor(SIGNS, dtype=torch.float64).repeat_interleave(pi_old.numel())
    advantages = (magnitude * signs)[:, None]  # [2P, 1]
    mask = torch.ones_like(logp, dtype=torch.bool)
    entropy = explicit_entropy(pi_theta, support, vocab_size).repeat(len(SIGNS))[:, None]
    return TokenInputs(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, entropy=entropy
    )


def _rows(inputs: TokenInputs, rows: Tensor) -> TokenInputs:
    """The points ``rows`` of ``inputs`` as a batch of their own, one prompt group."""
    return TokenInputs(
        logp=inputs.logp[rows],
        old_logp=inputs.old_logp[rows],
        advantages=inputs.advantages[rows],
        mask=inputs.mask[rows],
        entropy=None if inputs.entropy is None else inputs.entropy[rows],
        groups=torch.zeros(rows.numel(), dtype=torch.long),
    )


def point_terms(
    spec: LossSpec, params: LossParams, aggregation: Aggregation, inputs: TokenInputs
) -> LossTerms:
    """The loss on the [2P, 1] layout of `point_inputs`, split as its coupling requires (see
    the module docstring); differentiable in ``inputs.logp`` like the loss itself."""
    aggregates_itself = spec.aggregating_fn is not None  # it divides by what it is given
    if spec.coupling in ("token", "sequence") and not aggregates_itself:
        return spec.terms(inputs, params, aggregation)
    n = inputs.logp.shape[0]
    size = n // len(SIGNS)
    if spec.coupling == "group":  # point k's two signs (rows k and P + k): one prompt group
        parts = [torch.tensor([k, k + size]) for k in range(size)]
    else:  # "batch", or a function that aggregates itself: every token a batch of its own
        parts = [torch.tensor([k]) for k in range(n)]
    terms = [spec.terms(_rows(inputs, rows), params, aggregation) for rows in parts]
    back = torch.argsort(torch.cat(parts))  # [2P]: the rows in their original order

    def joined(values: list[Tensor]) -> Tensor:
        return torch.cat(values)[back]

    first = terms[0]
    return LossTerms(
        per_token=joined([t.per_token for t in terms]),
        per_token_grad=joined([t.per_token_grad for t in terms]),
        regions={r: joined([t.regions[r] for t in terms]) for r in first.regions},
        sequence_level=first.sequence_level,
        self_aggregated=first.self_aggregated,
        token_metrics={m: joined([t.token_metrics[m] for t in terms]) for m in first.token_metrics},
    )


def variant_curves(grid: Grid, variant: Variant, name: str) -> list[Curve]:
    """The curves of loss ``name`` in ``variant``: one per sign of A."""
    config = variant.config
    spec = get_loss(name)
    support = config.point_support()
    inputs = point_inputs(
        grid.pi_old, grid.pi_theta, config.advantage, config.check.vocab_size, support
    )
    with torch.no_grad():
        terms = point_terms(spec, config.loss.params(), config.loss.token_aggregation(), inputs)
    weight = (
        1.0
        if terms.self_aggregated
        else lone_token_weight(config.loss.aggregation, config.loss.loss_scale_factor)
    )
    g = terms.per_token_grad.to(torch.float64)[:, 0]  # [2P]
    adv = inputs.advantages[:, 0]  # [2P]
    ratio = torch.exp(inputs.logp - inputs.old_logp)[:, 0]  # [2P]
    p_y = trained_prob(grid.pi_theta, support)  # [P] π_θ(y), or π̃_θ(y) when replayed
    one_minus = (1.0 - p_y).repeat(len(SIGNS))  # [2P]
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
                pi_sampled=p_y,
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
