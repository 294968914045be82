"""Where the training–inference gap lives: by π_old(y_t) and by position in the completion.

With Δ_t = log π_old(y_t) − log μ(y_t), ρ_t = e^{Δ_t} and k3_t = ρ_t − 1 − Δ_t ≥ 0, the valid
tokens are split into buckets B, and for each

    count         |B|
    abs_diff_mean (1/|B|) Σ_{t∈B} |Δ_t|
    outside_band  share of B with ρ_t ∉ [low, high] (the band of the gap statistics)
    k3_share      Σ_{t∈B} k3_t / Σ_t k3_t: the bucket's part of the k3 KL (the shares sum to 1)

By probability: π_old(y_t) in [0, 1e-4), [1e-4, 1e-3), [1e-3, 0.01), [0.01, 0.1), [0.1, 0.5),
[0.5, 0.9), [0.9, 1] — decades in the tail, where a fixed error in the logit is a large
relative error in the probability (the DVP paper: the error of log π grows as 1/π), and the
confident tokens split at 0.5 and 0.9. By position: the token at index p among its sequence's
L valid tokens is in quarter ⌊4p/L⌋ (0–25 %, …, 75–100 %), so each sequence counts in each
quarter in proportion to its length: where in the completion the gap grows (a KV-cache drifting
with length shows up in the last quarter). Every bucket is listed, an empty one with nulls.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from gradlens.diagnostics.numbers import num
from gradlens.results import MismatchBucket

PROBABILITY_EDGES = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0)
QUARTERS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _g(x: float) -> str:
    return f"{x:g}"


def _buckets(
    index: Tensor,
    edges: tuple[float, ...],
    labels: list[str],
    delta: Tensor,
    band: tuple[float, float],
) -> list[MismatchBucket]:
    """Bucket i = the tokens with ``index == i`` (1-D tensors over the valid tokens)."""
    rho = delta.exp()
    k3 = rho - 1 - delta
    total = float(k3.sum())
    out = []
    for i, label in enumerate(labels):
        members = index == i
        count = int(members.sum())
        d, r = delta[members], rho[members]
        out.append(
            MismatchBucket(
                label=label,
                low=edges[i],
                high=edges[i + 1],
                count=count,
                abs_diff_mean=num(d.abs().mean()) if count else None,
                outside_band=num(((r < band[0]) | (r > band[1])).double().mean())
                if count
                else None,
                k3_share=num(k3[members].sum() / total) if count and total > 0 else None,
            )
        )
    return out


def _valid(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    old, roll = old_logp.double().cpu(), rollout_logp.double().cpu()
    valid = mask.cpu() & torch.isfinite(old - roll)
    return old, old - roll, valid


def by_probability(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, band: tuple[float, float]
) -> list[MismatchBucket]:
    """The module docstring's buckets of π_old(y_t)."""
    old, delta, valid = _valid(old_logp, rollout_logp, mask)
    p = old[valid].exp()
    inner = torch.tensor(PROBABILITY_EDGES[1:-1], dtype=torch.float64)
    index = torch.bucketize(p, inner, right=True)  # [e_i, e_{i+1}) → i; p = 1 → last
    labels = [f"{_g(a)}–{_g(b)}" for a, b in itertools.pairwise(PROBABILITY_EDGES)]
    labels[0], labels[-1] = f"<{_g(PROBABILITY_EDGES[1])}", f"≥{_g(PROBABILITY_EDGES[-2])}"
    return _buckets(index, PROBABILITY_EDGES, labels, delta[valid], band)


def by_position(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, band: tuple[float, float]
) -> list[MismatchBucket]:
    """The module docstring's quarters of the completion."""
    _, delta, valid = _valid(old_logp, rollout_logp, mask)
    m = mask.cpu()
    position = torch.cumsum(m.long(), -1) - 1  # index among the sequence's valid tokens
    length = m.long().sum(-1, keepdim=True).clamp(min=1)
    quarter = torch.div(4 * position, length, rounding_mode="floor").clamp(max=3)
    labels = [f"{int(100 * a)}–{int(100 * b)}%" for a, b in itertools.pairwise(QUARTERS)]
    return _buckets(quarter[valid], QUARTERS, labels, delta[valid], band)
