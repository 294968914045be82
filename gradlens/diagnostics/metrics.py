"""Further numbers of one loss: its per-token metrics aggregated, and what it reported itself.

A loss's ``token_metrics`` ([N, T], e.g. ``grpo``'s KL estimate ``kl``) are aggregated with the
run's aggregation weights a_t, Σ_t a_t·x_t, as verl's ``agg_loss`` aggregates its
``actor/kl_loss``. A loss's ``reported`` numbers (a verl-shaped function's metrics) are passed
through under their ``reported:`` names.

The training–inference gap of the batch, ρ = π_old(y)/μ_old(y), is summarised by
`rollout_stats` when the source has rollout log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import LossTerms
from gradlens.diagnostics.numbers import num, quantiles
from gradlens.grads import LossGradients
from gradlens.results import RolloutStats


def loss_metrics(grads: LossGradients) -> dict[str, float | None]:
    """``token_metrics`` aggregated with the run's weights, then the ``reported`` numbers."""
    weights = grads.agg_weights if grads.agg_weights is not None else grads.weights
    return terms_metrics(grads.terms, weights)


def terms_metrics(terms: LossTerms, agg_weights: Tensor) -> dict[str, float | None]:
    """`loss_metrics` from a loss's terms and the run's [N, T] aggregation weights a_t."""
    out: dict[str, float | None] = {
        name: num((agg_weights * values.to(agg_weights.dtype)).sum())
        for name, values in terms.token_metrics.items()
    }
    out.update({name: num(value) for name, value in terms.reported.items()})
    return out


def rollout_stats(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> RolloutStats:
    """Statistics of ρ = exp(ℓ_old − ℓ_rollout) over the valid tokens."""
    log_rho = (old_logp.double() - rollout_logp.double())[mask]  # [M]
    finite = torch.isfinite(log_rho)
    log_rho = log_rho[finite]
    if log_rho.numel() == 0:
        return RolloutStats(
            count=0,
            rho_mean=None,
            rho_min=None,
            rho_max=None,
            kl_k1=None,
            kl_k3=None,
            abs_diff_mean=None,
            abs_diff_max=None,
        )
    rho = log_rho.exp()
    p01, p05, p50, p95, p99 = quantiles(rho, (0.01, 0.05, 0.5, 0.95, 0.99))
    return RolloutStats(
        count=int(log_rho.numel()),
        rho_mean=num(rho.mean()),
        rho_min=num(rho.min()),
        rho_max=num(rho.max()),
        kl_k1=num((-log_rho).mean()),
        kl_k3=num((rho - 1 - log_rho).mean()),
        abs_diff_mean=num(log_rho.abs().mean()),
        abs_diff_max=num(log_rho.abs().max()),
        rms_diff=num(log_rho.pow(2).mean().sqrt()),
        rho_p01=p01,
        rho_p05=p05,
        rho_p50=p50,
        rho_p95=p95,
        rho_p99=p99,
    )
