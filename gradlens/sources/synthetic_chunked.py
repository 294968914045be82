"""The synthetic source above its materialized size: built in vocabulary blocks, no [M, V].

`gradlens.sources.synthetic` builds small batches on whole [N, T, V] tensors; above
``MATERIALIZE_ENTRIES`` it calls `build_chunked`, which draws the same kind of batch from random
streams of its own, one tile of ``ROW_TILE`` valid tokens × ``VOCAB_BLOCK`` vocabulary rows at a
time. For the M valid tokens' hidden states h [M, H] (operand dtype):

1. **Weight.** W0 ~ N(0, 1) [V, H], drawn in float32 block by block (block b from the generator
   ``stream(seed, "weight", b)``) and stored in the operand dtype, in the tensor that becomes the
   batch's lm_head. W = c·W0 (computed in float64, rounded to the operand dtype) with
   c = 1/(√H·τ) for a temperature τ, or the c that puts the mean entropy of π_θ on target
   (`gradlens.sources.synthetic_calibration`, over z⁰ = h·W0ᵀ).
2. **Logits.** z = c·z⁰ for float32 and float64 operands: h·Wᵀ up to the rounding of the
   product, of the order of a GEMM's own shape-dependent rounding, and no second GEMM; for
   bf16/fp16 operands, where rounding W to the operand dtype is not negligible,
   z = h·Wᵀ exactly as the engine computes it (`gradlens.logits.compute_logits`).
3. **Drift.** ``logit_noise``: z_old = z + scale·ε. ``stale_weight``: z_old = h·W_oldᵀ with
   W_old = W + scale·std(W)·ε' [V, H], std(W) = c·std(W0) from Σ W0 and Σ W0² in float64.
   ``none``: z_old = z. μ_old (``rollout_drift``): z_μ = z_old + rollout_drift·ε_μ. π_ref
   (``ref_drift``): z_ref = z + ref_drift·ε_ref. Each ε is N(0, 1), drawn in float32, per
   block from its own stream (``logit_noise``, ``stale``, ``rollout``, ``ref``) one tile of
   tokens after the other.
4. **Sampling**, exact, in the same sweep: y ~ softmax(z_s), z_s the sampler's logits (z_μ
   with ``rollout_drift``, else z_old). In block b a candidate v_b is drawn by inverse CDF, the
   first v with Σ_{w ≤ v} e^{z_s,w − m_b} > u_b·S_b (a float64 cumulative sum; m_b the block's
   maximum, S_b its Σ e^{z_s − m_b}), so P(v_b = v) = π_s(v | b). Across blocks,
   b* = argmax_b (lse_b + G_b) with lse_b = m_b + log S_b and G_b ~ Gumbel(0, 1), so
   P(b* = b) = e^{lse_b − lse} (the Gumbel-max trick over blocks), independently of the
   candidates. y = v_{b*}: P(y = v) = π_s(v | b)·P(b) = e^{z_s,v − lse} = π_s(v). Two
   uniforms u_b, u'_b (G_b = −log(−log u'_b)) per token and block, from the stream ``sample``.
5. **Log-probs.** log P(y) = z_P,y − lse_P for P = π_old, μ_old, π_ref, with lse_P combined
   over the blocks' (max, Σ e^{z − max}) in block order in float64, and z_P,y the logit kept
   with the winning candidate (the same tile values). The block holding the maximum contributes
   Σ ≥ 1, so lse_P ≥ max_v z_P,v ≥ z_P,y: every log-prob is ≤ 0 exactly.

Padded positions are not drawn (the caller puts token 0 and log-probs 0 there).

Reproducibility: every random number comes from a generator seeded by (seed, kind, block), and
every reduction runs over the same tiles in the same order, so the batch is a function of the
seed and the settings; the memory budget decides only which z⁰ tiles the calibration keeps
(`gradlens.sources.synthetic_calibration`), not any number. Exp arguments are clamped at
``EXP_FLOOR`` as there: a vocabulary entry less likely than e^−80 times the block's most likely
one is drawn with probability at most e^−80/S_b instead of less, 1e-35.

Memory: the batch's own W [V, H] (operand dtype), about ``WORK_TILES`` float64 tiles and four
[VOCAB_BLOCK, H] float64 weight blocks (`working_bytes`), and the calibration's kept tiles, which
take what the budget leaves. Cost: V·H float32 normal draws for W0 (plus V·H for
``stale_weight``); one z⁰ GEMM (2·M·H·V FLOP) per calibration sweep for the tiles not kept and
one in the final sweep unless all are kept (plus one for bf16/fp16 operands or
``stale_weight``); M·V float32 normal draws per noise (``logit_noise``, ``rollout_drift``,
``ref_drift``); a few element-wise passes over M·V per sweep.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import Tensor

from gradlens.config import SyntheticSource
from gradlens.logits import compute_logits, softmax_dtype
from gradlens.sources.synthetic_calibration import (
    EXP_FLOOR,
    ROW_TILE,
    VOCAB_BLOCK,
    LogitTiles,
    Scratch,
    entropy_scale_chunked,
    spans,
)

WORK_TILES = 12  # float64 [ROW_TILE, VOCAB_BLOCK] tiles alive at once in a sweep, at most

F32, F64 = torch.float32, torch.float64


@dataclass(frozen=True)
class ChunkedPolicies:
    """The weight and the rollout of a chunked synthetic batch, over its M valid tokens.

    Attributes:
        weight: [V, H] lm_head W = c·W0 in the operand dtype.
        tokens: [M] int64 sampled tokens y.
        old_logp, rollout_logp, ref_logp: [M] log π_old(y), log μ_old(y), log π_ref(y) in the
            softmax dtype (None: no μ_old, no π_ref).
        scale: c.
        sweeps: calibration sweeps over all tokens (0 with a temperature).
        kept_tiles, tiles: z⁰ tiles the calibration kept, of how many.
    """

    weight: Tensor
    tokens: Tensor
    old_logp: Tensor
    rollout_logp: Tensor | None
    ref_logp: Tensor | None
    scale: float
    sweeps: int
    kept_tiles: int
    tiles: int


def stream(seed: int, kind: str, block: int) -> torch.Generator:
    """The CPU generator of one kind of random number for one vocabulary block."""
    digest = hashlib.blake2b(f"gradlens/{seed}/{kind}/{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def working_bytes(hidden_size: int, tokens: int) -> int:
    """A sweep's working memory besides the kept tiles: ``WORK_TILES`` float64 tiles and four
    float64 [VOCAB_BLOCK, H] weight blocks."""
    return 8 * VOCAB_BLOCK * (WORK_TILES * min(tokens, ROW_TILE) + 4 * hidden_size)


class BlockLse:
    """Per-token lse = m + log S over blocks, combined in block order in float64."""

    def __init__(self, m: int) -> None:
        self.max = torch.full((m,), -math.inf, dtype=F64)
        self.sum = torch.zeros(m, dtype=F64)

    def add(self, rows: slice, block_max: Tensor, block_sum: Tensor) -> None:
        """Fold in one block's max m_b and Σ e^{z − m_b} (≥ 1) for the tokens ``rows``."""
        old_max, old_sum = self.max[rows], self.sum[rows]
        new_max = torch.maximum(old_max, block_max)
        kept = torch.where(old_sum > 0, old_sum * torch.exp(old_max - new_max), 0.0)
        self.max[rows] = new_max
        self.sum[rows] = kept + block_sum * torch.exp(block_max - new_max)

    def lse(self) -> Tensor:
        return self.max + torch.log(self.sum)


def draw_weight0(weight: Tensor, seed: int, moments: bool) -> tuple[float, float]:
    """Fill ``weight`` [V, H] with W0 ~ N(0, 1) (float32 draws, stored in its dtype), block b
    from ``stream(seed, "weight", b)``, the blocks in parallel threads (each generator in one
    thread). With ``moments``: (Σ W0, Σ W0²) in float64, summed in block order."""
    blocks = spans(weight.shape[0], VOCAB_BLOCK)

    def draw(b: int) -> tuple[float, float]:
        v0, v1 = blocks[b]
        gen = stream(seed, "weight", b)
        weight[v0:v1] = torch.randn(v1 - v0, weight.shape[1], generator=gen, dtype=F32)
        if not moments:
            return 0.0, 0.0
        w0 = weight[v0:v1].to(F64)
        return float(w0.sum()), float(w0.square().sum())

    workers = max(1, min(len(blocks), torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as pool:
        sums = list(pool.map(draw, range(len(blocks))))
    return math.fsum(s for s, _ in sums), math.fsum(q for _, q in sums)


@dataclass(frozen=True)
class BlockDraws:
    """The random numbers of one vocabulary block: u_b and u'_b [2, M] (float64), and ε' of
    ``stale_weight`` [Vb, H] (float32, else None)."""

    uniforms: Tensor
    stale: Tensor | None


def draws(
    seed: int, blocks: list[tuple[int, int]], rows: list[tuple[int, int]], m: int, h: int,
    noises: list[str], stale: bool,
) -> Iterator[BlockDraws | dict[str, Tensor]]:  # fmt: skip
    """Every random number of the final sweep, in the order it uses them: per block its
    `BlockDraws`, then per tile of tokens {stream: ε [R, Vb] (float32)}."""
    for b, (v0, v1) in enumerate(blocks):
        gens = {name: stream(seed, name, b) for name in noises}
        uniforms = torch.rand(2, m, generator=stream(seed, "sample", b), dtype=F64)
        eps = None
        if stale:
            eps = torch.randn(v1 - v0, h, generator=stream(seed, "stale", b), dtype=F32)
        yield BlockDraws(uniforms, eps)
        for r0, r1 in rows:
            shape = (r1 - r0, v1 - v0)
            yield {name: torch.randn(shape, generator=gens[name], dtype=F32) for name in noises}


T = TypeVar("T")
_END = object()


def ahead(items: Iterator[T]) -> Iterator[T]:
    """``items``, each made by a worker thread while the caller works on the one before (the
    random draws run beside the arithmetic; every generator still runs in one thread, in order)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, items, _END)
            yield cast(T, item)


def build_chunked(
    src: SyntheticSource, hidden: Tensor, seed: int, budget_bytes: int
) -> ChunkedPolicies:
    """Steps 1–5 of the module docstring for the valid tokens' hidden states ``hidden``
    [M, H] (operand dtype), within ``budget_bytes`` of working memory where it allows."""
    m, h = hidden.shape
    v, dtype = src.vocab_size, hidden.dtype
    acc = softmax_dtype(dtype)
    exact = dtype.itemsize >= 4  # z = c·z⁰ (step 2)
    blocks, rows = spans(v, VOCAB_BLOCK), spans(m, ROW_TILE)
    drift = src.drift
    stale = drift.kind == "stale_weight"

    # 1. W0 ~ N(0, 1) in the operand dtype; Σ W0 and Σ W0² for std(W); the scale c.
    weight = torch.empty(v, h, dtype=dtype)
    total, total_sq = draw_weight0(weight, seed, moments=stale)
    budget = max(0, budget_bytes - working_bytes(h, m))
    if src.entropy is not None:
        c, sweeps, tiles = entropy_scale_chunked(hidden.to(acc), weight, src.entropy, budget)
    else:
        assert src.temperature is not None  # the config validates that exactly one is set
        c, sweeps = 1.0 / math.sqrt(h) / src.temperature, 0
        tiles = LogitTiles(hidden.to(acc), weight, 0)
    std_w = 0.0
    if stale:
        n = v * h
        std_w = c * math.sqrt(max(total_sq - total * total / n, 0.0) / max(n - 1, 1))

    # 2.–5. One sweep: logits, drifts, sampling, log-probs.
    policies = ["old"] + ["rollout"] * (src.rollout_drift is not None)
    policies += ["ref"] * (src.ref_drift is not None)
    sampler = "rollout" if src.rollout_drift is not None else "old"
    # (stream, the logits it makes, the logits it perturbs, scale), in this order
    noises = [
        (name, made, base, scale)
        for name, made, base, scale in (
            ("logit_noise", "old", "theta", drift.scale if drift.kind == "logit_noise" else None),
            ("rollout", "rollout", "old", src.rollout_drift),
            ("ref", "ref", "theta", src.ref_drift),
        )
        if scale is not None
    ]
    lse = {name: BlockLse(m) for name in policies}
    logit_y = {name: torch.zeros(m, dtype=F64) for name in policies}
    best = torch.full((m,), -math.inf, dtype=F64)  # the winning block's key per token
    tokens = torch.zeros(m, dtype=torch.int64)
    scratch = Scratch()
    z0_tiles = tiles.tiles(keep=False) if exact else None
    random = ahead(draws(seed, blocks, rows, m, h, [n for n, *_ in noises], stale))
    for v0, v1 in blocks:
        block = next(random)
        assert isinstance(block, BlockDraws)
        w = scratch.get("w", (v1 - v0, h), F64).copy_(weight[v0:v1]).mul_(c)  # W = c·W0
        if not exact:
            weight[v0:v1] = w
        w_old = None
        if block.stale is not None:
            noise = scratch.get("w_old", (v1 - v0, h), F64).copy_(block.stale)
            w_old = noise.mul_(drift.scale * std_w).add_(w).to(dtype)
        for r0, r1 in rows:
            tile, shape = slice(r0, r1), (r1 - r0, v1 - v0)
            eps = next(random)
            assert isinstance(eps, dict)
            if z0_tiles is not None:
                z0 = next(z0_tiles)[1]
                z = torch.mul(z0, c, out=scratch.get("z", shape, acc))
            else:
                z = compute_logits(hidden[tile], weight[v0:v1])
            logits = {"theta": z, "old": z}
            if w_old is not None:
                logits["old"] = compute_logits(hidden[tile], w_old)
            for name, made, base, scale in noises:  # z_made = z_base + scale·ε
                drifted = scratch.get(name, shape, acc).copy_(eps[name]).mul_(scale)
                logits[made] = drifted.add_(logits[base])

            # the sampler: a candidate per block by inverse CDF, the block by Gumbel-max
            zs = logits[sampler]
            zs_max = zs.amax(-1, keepdim=True)
            p = torch.sub(zs, zs_max, out=scratch.get("p", shape, acc))
            p.clamp_(min=EXP_FLOOR).exp_()
            cdf = torch.cumsum(p, -1, dtype=F64, out=scratch.get("cdf", shape, F64))
            mass = cdf[:, -1]  # S_b ≥ 1
            u = block.uniforms[:, tile]
            cand = torch.searchsorted(cdf, (u[0] * mass)[:, None], right=True).squeeze(-1)
            cand.clamp_(max=v1 - v0 - 1)  # u·S_b rounded up to S_b
            zs_max64 = zs_max.squeeze(-1).to(F64)
            key = zs_max64 + torch.log(mass) - torch.log(-torch.log(u[1]))
            take = key > best[tile]
            best[tile] = torch.where(take, key, best[tile])
            tokens[tile] = torch.where(take, cand + v0, tokens[tile])
            for name in policies:
                zp = logits[name]
                if name == sampler:
                    lse[name].add(tile, zs_max64, mass)
                else:
                    zp_max = zp.amax(-1, keepdim=True)
                    p = torch.sub(zp, zp_max, out=scratch.get("p", shape, acc))
                    zp_sum = p.clamp_(min=EXP_FLOOR).exp_().sum(-1)
                    lse[name].add(tile, zp_max.squeeze(-1).to(F64), zp_sum.to(F64))
                at_cand = zp.gather(-1, cand[:, None]).squeeze(-1).to(F64)
                logit_y[name][tile] = torch.where(take, at_cand, logit_y[name][tile])
        if exact:
            weight[v0:v1] = w
    assert next(random, None) is None

    logp = {name: (logit_y[name] - lse[name].lse()).to(acc) for name in policies}
    return ChunkedPolicies(
        weight=weight,
        tokens=tokens,
        old_logp=logp["old"],
        rollout_logp=logp.get("rollout"),
        ref_logp=logp.get("ref"),
        scale=c,
        sweeps=sweeps,
        kept_tiles=len(tiles.kept),
        tiles=len(blocks) * len(rows),
    )
