"""The engine's attribution sums: the sequence layout, the GEMM count, chunking and the
vocab-parallel engine (the values themselves against autograd: tests/diagnostics).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import make_batch
from torch import Tensor

from gradlens.containers import Batch, valid_index
from gradlens.engine.attribution import AttributionPlan, AttributionSums, sequence_layout
from gradlens.engine.collectives import Collectives
from gradlens.engine.launch import run_ranks
from gradlens.engine.streamed import EnginePlan, EngineResult, lm_head_pass
from gradlens.engine.vocab_parallel import vocab_parallel_pass
from gradlens.engine.vocab_split import VocabSplit, balanced_split
from gradlens.grads import objective, on_grid
from gradlens.losses import Aggregation, LossParams, get_loss

F64 = torch.float64
NAMES = ["ppo_clip", "grpo", "sft"]
# float64; the runs differ only in the order of the sums over the vocabulary (chunks, shards):
# ≲ 100 terms of ≤ 1 ulp each relative to the quantity's scale
TOL = 1e-12


def batch_of(seed: int, lengths: list[int], v: int = 40, h: int = 5) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    n, t = len(lengths), max(lengths)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # [N, T]
    hidden = torch.randn(n, t, h, generator=gen, dtype=F64)
    weight = 2.0 * torch.randn(v, h, generator=gen, dtype=F64) / math.sqrt(h)
    tokens = torch.randint(0, v, (n, t), generator=gen)
    adv = torch.randn(n, generator=gen, dtype=F64)
    batch = make_batch(hidden, weight, tokens, mask, advantages=adv[:, None].expand(n, t).clone())
    noise = torch.randn(2, n, t, generator=gen, dtype=F64)
    return dataclasses.replace(
        batch, old_logp=batch.old_logp - 0.3 * noise[0], ref_logp=batch.old_logp + 0.2 * noise[1]
    )


def engine_inputs(batch: Batch, bonus: bool):
    rows, cols = valid_index(batch.mask)
    params = LossParams(kl_coef=0.2, entropy_coef=0.05 if bonus else 0.0)
    agg = Aggregation("seq_mean_token_mean")

    def coefficients(logp: Tensor) -> list[Tensor]:
        grid = on_grid(logp, rows, cols, batch.mask.shape)
        return [
            objective(batch, grid, get_loss(n), params, agg).coefficient[rows, cols] for n in NAMES
        ]

    weight = None
    if bonus:
        weight = params.entropy_coef * agg.weights(batch.mask, F64)[rows, cols]
    hidden = batch.hidden[rows, cols]
    layout = sequence_layout(rows, batch.num_sequences, hidden)
    return hidden, batch.tokens[rows, cols], coefficients, weight, AttributionPlan(2, layout)


def sums_fields(s: AttributionSums) -> dict[str, Tensor]:
    out = {"other_sq": s.tokens.other_sq, "other_pd": s.tokens.other_pd, "dd": s.tokens.dd}
    for i, loss in enumerate(s.losses):
        out |= {f"u{i}": loss.u, f"e{i}": loss.e, f"seq{i}": loss.sequence_sq}
    return out


def assert_same(got: EngineResult, ref: EngineResult, label: str) -> None:
    assert got.attribution is not None and ref.attribution is not None
    a, b = sums_fields(got.attribution), sums_fields(ref.attribution)
    for key, x in a.items():
        y = b[key]
        err = float((x - y).abs().max())
        assert err <= TOL * float(y.abs().max()), f"{label}: {key} differs by {err:.3g}"


def test_layout_blocks_cover_every_token_once():
    """Longest sequences first, at most M padded tokens a block, ghost iff T_b ≤ H."""
    lengths = [9, 1, 4, 0, 9, 2, 6, 3]
    batch = batch_of(0, lengths)
    rows, _ = valid_index(batch.mask)
    hidden = batch.hidden[batch.mask]
    layout = sequence_layout(rows, batch.num_sequences, hidden)
    m, h = rows.numel(), hidden.shape[1]
    seen = torch.cat([b.tokens for b in layout.blocks])
    assert sorted(seen.tolist()) == list(range(m))
    ids = torch.cat([b.sequences for b in layout.blocks]).tolist()
    assert sorted(ids) == [i for i, n in enumerate(lengths) if n > 0]  # the empty one left out
    for b in layout.blocks:
        assert b.sequences.numel() * b.width <= m
        assert b.ghost == (b.width <= h)
        assert all(lengths[i] <= b.width for i in b.sequences.tolist())
        padded = b.padded(hidden)
        assert torch.equal(padded[b.rows, b.cols], hidden[b.tokens])
    # M = 34, H = 5: lengths 9, 9, 6 (> H, padded to 9, 3·9 ≤ 34) | 4, 3, 2, 1 (ghost)
    assert [b.ghost for b in layout.blocks] == [False, True]
    assert [b.width for b in layout.blocks] == [9, 4]
    # multiply-adds per vocabulary row: a direct block T_b·H per sequence, a ghost one T_b²
    assert layout.multiply_adds_per_row == 3 * 9 * h + 4 * 4 * 4


@pytest.mark.parametrize("bonus", [False, True], ids=["plain", "entropy-bonus"])
def test_chunking_and_residency_do_not_change_the_sums(bonus: bool):
    batch = batch_of(1, [7, 3, 5, 1, 7])
    hidden, tokens, coefficients, weight, attr = engine_inputs(batch, bonus)
    one = lm_head_pass(
        hidden,
        batch.weight,
        tokens,
        coefficients,
        EnginePlan(64, 1),
        weight,
        None,
        attribution=attr,
    )
    for plan in (EnginePlan(3, 0), EnginePlan(7, 2), EnginePlan(16, 99)):
        got = lm_head_pass(
            hidden, batch.weight, tokens, coefficients, plan, weight, None, attribution=attr
        )
        assert_same(got, one, str(plan))


def test_gemm_count_adds_the_attribution_work():
    """Per attributed loss and vocabulary row: M·H for Q = R hᵀ and the layout's multiply-adds,
    in units of M·H·V."""
    batch = batch_of(2, [7, 3, 5, 1, 7])
    hidden, tokens, coefficients, _, attr = engine_inputs(batch, False)
    plan = EnginePlan(8, 0)
    base = lm_head_pass(hidden, batch.weight, tokens, coefficients, plan)
    got = lm_head_pass(hidden, batch.weight, tokens, coefficients, plan, attribution=attr)
    m, h = hidden.shape
    v = batch.weight.shape[0]
    per_loss = (m * h + attr.layout.multiply_adds_per_row) / (m * h)
    assert got.gemm_equivalents == pytest.approx(base.gemm_equivalents + 2 * per_loss, rel=1e-12)
    assert v > plan.vocab_chunk  # several chunks: the count is a sum over them


def attribution_ranks(rank: int, world: int, batch: Batch, split: VocabSplit):
    """Both cases on this rank: each result and the sizes of its collectives."""
    out = []
    for bonus in (False, True):
        hidden, tokens, coefficients, weight, attr = engine_inputs(batch, bonus)
        comm = Collectives()
        got = vocab_parallel_pass(
            hidden,
            split.weight_shard(batch.weight, rank),
            tokens,
            coefficients,
            EnginePlan(4, 1),
            split,
            comm,
            entropy_weight=weight,
            attribution=attr,
        )
        out.append((got, [(r.step, r.elements) for r in comm.log]))
    return out


@pytest.mark.slow
def test_vocab_parallel_sums_equal_the_single_process_engine():
    """Two gloo ranks, without and with the entropy bonus."""
    batch = batch_of(3, [6, 2, 6, 4])
    split = balanced_split(batch.weight.shape[0], 2)
    launched = run_ranks(attribution_ranks, 2, (batch, split), timeout_s=120)
    for case, bonus in enumerate((False, True)):
        hidden, tokens, coefficients, weight, attr = engine_inputs(batch, bonus)
        plan = EnginePlan(5, 0)
        ref = lm_head_pass(
            hidden, batch.weight, tokens, coefficients, plan, weight, None, attribution=attr
        )
        m, n, k, h = hidden.shape[0], batch.num_sequences, len(NAMES), hidden.shape[1]
        for rank, results in enumerate(launched):
            got, log = results[case]
            assert_same(got, ref, f"rank {rank}, bonus {bonus}")
            # pass 1 combines H_t (m, ζ, α, μ and the float64 S and T: 6 columns, all float64
            # here); the finishing sum carries 3·M shared sums and u, e [M] and ‖G_i‖² [N] per
            # attributed loss beside the usual fields; the float64 zero-sum sums (k·H row sums,
            # Σ π and with the bonus Σ E per token) travel in their own all_gather
            e = int(bonus)
            assert log[0] == ("pass1", m * 6)
            usual = k * split.vocab + (1 + k * e) * m + 1
            assert log[1] == ("finish.sum", usual + 3 * m + attr.losses * (2 * m + n))
            assert log[2] == ("finish.gather", k * h + (1 + e) * m)
