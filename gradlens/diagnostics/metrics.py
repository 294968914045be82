"""Further numbers of one loss: its per-token metrics aggregated, and what it reported itself.

A loss's ``token_metrics`` ([N, T], e.g. ``grpo``'s KL estimate ``kl``) are aggregated with the
run's aggregation weights a_t, Σ_t a_t·x_t, as verl's ``agg_loss`` aggregates its
``actor/kl_loss``. A loss's ``reported`` numbers (a verl-shaped function's metrics) are passed
through under their ``reported:`` names.
"""

from __future__ import annotations

from torch import Tensor

from gradlens.containers import LossTerms
from gradlens.diagnostics.numbers import num


def terms_metrics(terms: LossTerms, agg_weights: Tensor) -> dict[str, float | None]:
    """``token_metrics`` aggregated with the run's [N, T] aggregation weights a_t, then the
    ``reported`` numbers."""
    out: dict[str, float | None] = {
        name: num((agg_weights * values.to(agg_weights.dtype)).sum())
        for name, values in terms.token_metrics.items()
    }
    out.update({name: num(value) for name, value in terms.reported.items()})
    return out
