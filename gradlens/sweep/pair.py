"""Where two losses' per-token gradients differ, as a function of the ratio r and the sign of A
(``gradlens losses --compare A,B``).

Every c-form loss sends c_t·(e_y − π) to the logits with c_t = a_t·g_t; for a lone token (the
sweep's layout, `gradlens.sweep.curves`) a_t is the same for both losses, so two losses differ
exactly where their g differ. This evaluates both on a grid of r = π_θ(y)/π_old(y) at a fixed
π_θ(y) (π_old = π_θ/r), for A = +|A| and A = −|A|, with the run's loss settings:

    g_A(r, A), g_B(r, A)   each loss's g_t at the point
    differ                 |g_A − g_B| > tol·max(|g_A|, |g_B|, |A|), tol = 1e-9 (float64: the
                           two formulas agree to a few ulps where they are the same maths), or
                           either g not a number
    rules_A, rules_B       the regions (clip rules) each loss reports at the point

Coupled losses are evaluated as the sweep does (a ``group`` loss on the point's two signs as one
prompt group, a ``batch`` loss on each token alone). The corrections, the entropy bonus and the
top-entropy selection act outside the loss functions and are not part of the comparison.
Results are plain data; `gradlens.cli.info` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradlens.errors import GradlensError
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.sweep.curves import SIGNS, point_inputs, point_terms

# r from 1/10 to 10, dense around 1 where the clip bounds sit (1 ± 0.2, 0.28, the dual clip 3).
DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.5, 0.7, 0.79, 0.81, 0.9, 1.0, 1.1, 1.19, 1.21)
DEFAULT_RATIOS += (1.27, 1.29, 1.5, 2.0, 2.9, 3.1, 5.0, 10.0)
TOL = 1e-9  # float64 relative agreement of two evaluations of one formula (a few ulps ≪ 1e-9)


@dataclass(frozen=True)
class PairRow:
    """One point of the grid: the two losses' g at (r, A) and whether they differ."""

    ratio: float
    advantage: float
    grad_a: float
    grad_b: float
    differ: bool
    rules_a: tuple[str, ...]
    rules_b: tuple[str, ...]


@dataclass(frozen=True)
class PairTable:
    """Two losses compared over r for both signs of A (rows: A > 0 first, r ascending)."""

    loss_a: str
    loss_b: str
    pi_theta: float
    rows: tuple[PairRow, ...]

    def differing(self, advantage_sign: float) -> tuple[float, ...]:
        """The ratios at which the two losses differ for A of this sign."""
        return tuple(
            r.ratio for r in self.rows if r.differ and (r.advantage > 0) == (advantage_sign > 0)
        )


def compare_pair(
    loss_a: str,
    loss_b: str,
    params: LossParams | None = None,
    aggregation: Aggregation | None = None,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    pi_theta: float = 0.09,
    magnitude: float = 1.0,
) -> PairTable:
    """g_A and g_B on the grid of ``ratios`` at π_θ(y) = ``pi_theta`` (π_old = π_θ/r ≤ 1)."""
    if loss_a == loss_b:
        raise GradlensError(f"--compare needs two different losses, got {loss_a} twice")
    if not 0 < pi_theta < 1 or any(r <= 0 or pi_theta / r >= 1 for r in ratios):
        raise GradlensError(
            f"--compare: every ratio r needs π_old = π_θ/r in (0, 1) with π_θ = {pi_theta}; "
            f"use ratios above {pi_theta}"
        )
    params = params or LossParams()
    aggregation = aggregation or Aggregation()
    r = torch.tensor(ratios, dtype=torch.float64)
    pi = torch.full_like(r, pi_theta)
    inputs = point_inputs(pi / r, pi, magnitude)
    grads, rules = [], []
    for name in (loss_a, loss_b):
        spec = get_loss(name)
        with torch.no_grad():
            terms = point_terms(spec, params, aggregation, inputs)
        grads.append(terms.per_token_grad[:, 0].to(torch.float64))  # [2P]
        rules.append({k: v[:, 0] for k, v in terms.regions.items()})
    advantages = inputs.advantages[:, 0]
    rows = []
    for k in range(len(SIGNS) * len(ratios)):
        ga, gb = float(grads[0][k]), float(grads[1][k])
        scale = max(abs(ga), abs(gb), abs(float(advantages[k])))
        rows.append(
            PairRow(
                ratio=ratios[k % len(ratios)],
                advantage=float(advantages[k]),
                grad_a=ga,
                grad_b=gb,
                differ=not abs(ga - gb) <= TOL * scale,  # NaN on either side: they differ
                rules_a=tuple(n for n, m in rules[0].items() if bool(m[k])),
                rules_b=tuple(n for n, m in rules[1].items() if bool(m[k])),
            )
        )
    return PairTable(loss_a, loss_b, pi_theta, tuple(rows))
