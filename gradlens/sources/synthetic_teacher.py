"""The synthetic source's distillation teacher (``source.teacher: perturbed``).

Construction, after the batch itself is built (so that nothing of the batch changes):

    h'_t = h_t (the student's hidden states, the same tensor),
    W'   = W + σ·std(W)·ε,   ε ~ N(0, 1) [V, H],   q_t = softmax(W' h_t),

σ = ``source.teacher_scale``: the teacher is the student's lm_head perturbed, like the
``stale_weight`` drift of π_old. std(W) is the sample standard deviation of all V·H entries of
the batch's W (in the run's dtype), from Σ W and Σ W² in float64 summed block by block. ε is
drawn in float32, vocabulary block b (``VOCAB_BLOCK`` rows) from the generator
``stream(seed, "teacher", b)``, so the teacher is the same in the materialized and in the
chunked construction for the same W, and on any device.

log q_t(y_t), the teacher's log-prob of the sampled token (on-policy distillation's ℓ^T), is
z'_y − logsumexp_v z'_v over the valid tokens, the logsumexp combined over tiles of
``ROW_TILE`` tokens × ``VOCAB_BLOCK`` rows in float64: nothing of size N·T·V is held, only W'
[V, H] in the run's dtype and one tile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradlens.containers import Teacher
from gradlens.logits import compute_logits, softmax_dtype
from gradlens.sources.synthetic_calibration import ROW_TILE, VOCAB_BLOCK, spans
from gradlens.sources.synthetic_chunked import F32, F64, BlockLse, stream


def weight_std(weight: Tensor) -> float:
    """The sample standard deviation of every entry of ``weight``, from float64 block sums."""
    total = total_sq = 0.0
    for v0, v1 in spans(weight.shape[0], VOCAB_BLOCK):
        block = weight[v0:v1].to(F64)
        total += float(block.sum())
        total_sq += float(block.square().sum())
    n = weight.numel()
    return math.sqrt(max(total_sq - total * total / n, 0.0) / max(n - 1, 1))


def perturbed_weight(weight: Tensor, scale: float, seed: int) -> Tensor:
    """[V, H] W' = W + σ·std(W)·ε in ``weight``'s dtype and device (module docstring)."""
    sigma = scale * weight_std(weight)
    out = torch.empty_like(weight)
    for b, (v0, v1) in enumerate(spans(weight.shape[0], VOCAB_BLOCK)):
        eps = torch.randn(v1 - v0, weight.shape[1], generator=stream(seed, "teacher", b), dtype=F32)
        block = weight[v0:v1].to(F64) + sigma * eps.to(F64).to(weight.device)
        out[v0:v1] = block.to(weight.dtype)
    return out


def sampled_logp(hidden: Tensor, weight: Tensor, tokens: Tensor) -> Tensor:
    """[M] log softmax(W' h_m)(y_m) for the valid tokens' ``hidden`` [M, H] and ``tokens`` [M],
    in tiles (module docstring); in the softmax dtype of ``weight``'s dtype."""
    m = hidden.shape[0]
    lse = BlockLse(m)
    logit_y = torch.zeros(m, dtype=F64)
    for r0, r1 in spans(m, ROW_TILE):
        tile = slice(r0, r1)
        for v0, v1 in spans(weight.shape[0], VOCAB_BLOCK):
            z = compute_logits(hidden[tile], weight[v0:v1]).to(F64).cpu()  # [r, Vb]
            z_max = z.amax(-1)
            lse.add(tile, z_max, (z - z_max[:, None]).exp().sum(-1))
            y = tokens[tile].cpu()
            inside = (y >= v0) & (y < v1)
            at = z.gather(-1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(-1)
            logit_y[tile] = torch.where(inside, at, logit_y[tile])
    return (logit_y - lse.lse()).to(softmax_dtype(weight.dtype))


def perturbed_teacher(
    hidden: Tensor, weight: Tensor, tokens: Tensor, mask: Tensor, scale: float, seed: int
) -> Teacher:
    """The teacher of the module docstring for a batch's ``hidden`` [N, T, H], ``weight``
    [V, H], ``tokens`` and ``mask`` [N, T]; log q(y) is 0 at padded positions."""
    teacher_weight = perturbed_weight(weight, scale, seed)
    logq = sampled_logp(hidden[mask], teacher_weight, tokens[mask])
    grid = torch.zeros(mask.shape, dtype=logq.dtype).masked_scatter_(mask.cpu(), logq)
    return Teacher(hidden=hidden, weight=teacher_weight, sampled_logp=grid.to(hidden.device))
