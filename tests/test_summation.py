"""gradlens.summation and the softmax normaliser of gradlens.logits: the orders and the bounds
the zero-sum tolerances rest on (gradlens/diagnostics/tolerances.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradlens.logits import log_probs, merge, merge_all, normaliser
from gradlens.summation import (
    BLOCK,
    Cascade,
    PairwiseSum,
    block_sums,
    chunked_depth,
    compensated_sum,
    depth,
    grid_parts,
    halving_sum,
    join,
    pairwise_sum,
)

U64 = 2.0**-53


def exact(x: torch.Tensor) -> float:
    """Σ x correctly rounded (math.fsum) of a 1-d tensor."""
    return math.fsum(x.double().tolist())


# ----------------------------------------------------------------------------- pairwise_sum


def test_pairwise_sum_keeps_what_a_running_sum_loses():
    # 1 followed by 2¹⁶ − 1 terms of 2⁻⁵⁴, half an ulp of 1: a running float64 sum rounds each
    # one away (1 + 2⁻⁵⁴ rounds to even, 1), so it returns 1 and is off by (2¹⁶ − 1)·2⁻⁵⁴ =
    # 3.6e-12. Halving adds the small terms to each other first; the bound ⌈log2 n⌉·u64·Σ|x| =
    # 16·2⁻⁵³·(1 + 3.6e-12) = 1.8e-15 holds.
    x = torch.cat([torch.ones(1, dtype=torch.float64), torch.full((2**16 - 1,), 2.0**-54)])
    running = torch.cumsum(x, 0)[-1]  # sequential on the CPU
    truth = exact(x)
    assert abs(float(running) - truth) > 3e-12
    assert abs(float(pairwise_sum(x)) - truth) <= depth(x.numel()) * U64 * exact(x.abs())


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000, 4097])
def test_pairwise_sum_is_within_its_bound(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 8, (3, n), generator=gen
    )
    got = pairwise_sum(x)  # [3]
    assert got.shape == (3,) and got.dtype == torch.float64
    for row, value in zip(x, got, strict=True):
        bound = depth(n) * U64 * exact(row.abs())  # 0 for n ≤ 1: then it is exact
        assert abs(float(value) - exact(row)) <= bound
    # any dimension, float32 input converted exactly
    assert torch.equal(pairwise_sum(x.T, dim=0), got)
    assert pairwise_sum(x.float()).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_sums_add_each_blocks_eight_entries_in_sequence_along_any_dimension(dtype):
    # the order the docstring states, ((x0 + x1) + x2) + … + x7 in float64, written out by hand;
    # the input is left as it was (a float64 input is not summed in place)
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 40, 5, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    before = x.clone()
    expected = torch.zeros(3, 5, 5, dtype=torch.float64)
    for b in range(5):
        for i in range(BLOCK):
            expected[:, b] += x[:, BLOCK * b + i].double()
    assert torch.equal(block_sums(x, 1), expected)
    assert torch.equal(block_sums(x.transpose(1, 2), 2), expected.transpose(1, 2))
    assert torch.equal(x, before)


def test_a_cascade_puts_each_chunk_through_at_most_floor_log2_n_plus_1_merges():
    # merge = max + 1 counts the merges above the deepest chunk
    for n in range(1, 600):
        cascade: Cascade[int] = Cascade(lambda a, b: max(a, b) + 1)
        for _ in range(n):
            cascade.add(0)
        assert cascade.result() <= math.floor(math.log2(n)) + 1
    assert Cascade(max).result() is None


@pytest.mark.parametrize("vocab", [1, 2, 3, 255, 1000, 4097, 65_537, 262_144])
@pytest.mark.parametrize("chunk", [1, 3, 256, 777, 4096, 1_000_000])
def test_a_chunked_pairwise_sum_has_depth_at_most_log2_v_plus_3(vocab, chunk):
    cascade: Cascade[int] = Cascade(lambda a, b: max(a, b) + 1)
    for start in range(0, vocab, chunk):
        cascade.add(depth(min(chunk, vocab - start)))
    assert cascade.result() <= chunked_depth(vocab)


def test_pairwise_sum_over_chunks_is_a_sum():
    x = torch.randn(5, 1001, dtype=torch.float64)
    acc = PairwiseSum((5,), x.device)
    assert torch.equal(acc.total(), torch.zeros(5, dtype=torch.float64))
    for start in range(0, 1001, 100):
        acc.add(pairwise_sum(x[:, start : start + 100]))
    assert torch.allclose(acc.total(), x.sum(-1), rtol=0, atol=1e-12)


def test_halving_sum_is_pairwise_sums_second_stage():
    # the fused engine's kernels write the float64 sums of each 8 columns; halving them must be
    # bit for bit what pairwise_sum does with the same blocks
    x = torch.randn(3, 1003, dtype=torch.float32)
    padded = torch.cat([x, x.new_zeros(3, BLOCK - 1003 % BLOCK)], -1)
    blocks = padded.unflatten(-1, (-1, BLOCK)).sum(-1, dtype=torch.float64)  # [3, 126]
    assert torch.equal(halving_sum(blocks), pairwise_sum(x))
    assert torch.equal(halving_sum(blocks.T, dim=0), pairwise_sum(x))
    assert torch.equal(halving_sum(torch.zeros(3, 0, dtype=torch.float64)), torch.zeros(3).double())


def test_compensated_sum_rounds_once_whatever_the_number_of_parts():
    # 1 and four parts of 2⁻⁵³ (half an ulp of 1), in that order: a running sum rounds
    # 1 + 2⁻⁵³ to 1 (ties to even) four times and returns 1; the exact sum 1 + 4·2⁻⁵³ = 1 + 2⁻⁵¹
    # is a float64 (two ulps of 1), and the compensated sum returns it.
    x = torch.tensor([1.0, U64, U64, U64, U64], dtype=torch.float64)[:, None]  # [P = 5, 1]
    running = x[0].clone()
    for part in x[1:]:
        running = running + part
    assert float(running[0]) == 1.0
    assert float(compensated_sum(x)[0]) == 1.0 + 2.0**-51


@pytest.mark.parametrize("parts", [1, 2, 3, 8, 64])
def test_compensated_sum_is_within_one_rounding(parts):
    # |result − Σ| ≤ u64·|Σ| + γ²_{P−1}·Σ|x| (Sum2), with γ_{P−1} ≤ P·u64
    gen = torch.Generator().manual_seed(parts)
    x = torch.randn(parts, 50, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 6, (parts, 50), generator=gen
    )
    got = compensated_sum(x)
    for j in range(50):
        col = x[:, j]
        truth = exact(col)
        bound = U64 * abs(truth) + (parts * U64) ** 2 * exact(col.abs())
        assert abs(float(got[j]) - truth) <= bound


def test_grid_parts_split_exactly_and_their_high_parts_add_in_any_order_exactly():
    # bound 3, 4 terms: q = 2^(⌈log2 12⌉ − 52) = 2⁻⁴⁸; 1 + 2⁻⁵² splits into hi = 1 (the nearest
    # multiple of q) and lo = 2⁻⁵².
    hi, lo = grid_parts(torch.tensor([1.0 + 2.0**-52], dtype=torch.float64), 3.0, 4)
    assert float(hi[0]) == 1.0 and float(lo[0]) == 2.0**-52
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 200, generator=gen, dtype=torch.float64) * 2 - 1) * 1000.0  # |x| ≤ 1000
    hi, lo = grid_parts(x, 1000.0, 6)
    assert torch.equal(hi + lo, x)  # the split is exact
    assert float(lo.abs().max()) <= 2.0 ** (14 - 52) / 2  # q = 2^(⌈log2 6000⌉ − 52)
    forward = hi.sum(0)  # whatever order a backend adds the 6 ranks' hi in, the same bits
    for order in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3]):
        acc = torch.zeros(200, dtype=torch.float64)
        for r in order:
            acc = acc + hi[r]
        assert torch.equal(acc, forward)
    for j in range(200):
        assert float(forward[j]) == exact(hi[:, j])  # and it is the exact sum
    total = join(forward, lo.sum(0))  # one rounding, the lo's sum of second order
    for j in range(200):
        truth = exact(x[:, j])
        assert abs(float(total[j]) - truth) <= U64 * abs(truth) + 6 * U64 * 2.0 ** (14 - 52)


# ----------------------------------------------------------------------------- the normaliser


def logits(vocab: int, scale: float, tiled: bool, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = 1000 if tiled else vocab
    z = scale * torch.randn(4, width, generator=gen, dtype=torch.float64)
    if tiled:
        z = z.repeat(1, -(-vocab // width))[:, :vocab]
    return z.to(dtype)


def chunked(z: torch.Tensor, chunk: int, tilt: bool = False):
    cascade = Cascade(merge)
    for start in range(0, z.shape[1], chunk):
        cascade.add(normaliser(z[:, start : start + chunk], tilt))
    return cascade.result()


def test_chunks_merge_to_the_whole_vocabulary_normaliser():
    z = logits(5000, 10.0, False, torch.float64)
    whole = normaliser(z, tilt=True)
    ref = torch.logsumexp(z, -1)
    probs = torch.softmax(z, -1)
    entropy = -(probs * torch.log_softmax(z, -1)).sum(-1)
    for chunk in (1, 7, 256, 5000):
        part = chunked(z, chunk, tilt=True)
        assert torch.equal(part.max, whole.max)  # exact
        # S and T to a few hundred float64 roundings, whatever the chunking
        assert torch.allclose(part.sum, whole.sum, rtol=1e-13, atol=0)
        assert torch.allclose(part.lse(), ref, rtol=1e-14, atol=0)
        assert torch.allclose(part.entropy(), entropy, rtol=1e-12, atol=0)
    a, b = normaliser(z[:, :100], True), normaliser(z[:, 100:], True)
    ab, ba = merge(a, b), merge(b, a)
    assert torch.equal(ab.sum, ba.sum) and ab.tilt is not None and ba.tilt is not None
    assert torch.equal(ab.tilt, ba.tilt)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_merge_all_combines_p_parts_as_the_whole_vocabulary(parts):
    # the vocab-parallel engine's ranks: P normalisers of a split vocabulary, merged at once
    z = logits(5000, 10.0, False, torch.float64, seed=parts)
    whole = normaliser(z, tilt=True)
    bounds = [round(i * 5000 / parts) for i in range(parts + 1)]
    pieces = [normaliser(z[:, a:b], True) for a, b in itertools.pairwise(bounds)]
    tilts = torch.stack([p.tilt for p in pieces if p.tilt is not None])
    got = merge_all(
        torch.stack([p.max for p in pieces]), torch.stack([p.sum for p in pieces]), tilts
    )
    assert torch.equal(got.max, whole.max)
    assert torch.allclose(got.sum, whole.sum, rtol=1e-13, atol=0)
    assert got.tilt is not None and whole.tilt is not None
    assert torch.allclose(got.entropy(), whole.entropy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tiled", [False, True], ids=["random", "tiled"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("vocab", [1000, 32_768])
def test_the_probabilities_sum_to_one_within_the_derived_bound(vocab, scale, tiled, dtype):
    # tolerances.py: |Σ_v π_v − 1| ≤ u·(4·ln V + 8) + (6L + 1)·u_w, for any chunking, whatever
    # the size of the logits (scale 30: |z| up to ~150, which the previous bound charged 2·|z|·u)
    z = logits(vocab, scale, tiled, dtype)
    u = torch.finfo(dtype).eps / 2
    bound = u * (4 * math.log(vocab) + 8) + (6 * chunked_depth(vocab) + 1) * U64
    for chunk in (256, 777, vocab):
        norm = chunked(z, chunk)
        total = sum(
            pairwise_sum(torch.exp(log_probs(z[:, s : s + chunk], norm)))
            for s in range(0, vocab, chunk)
        )  # float64, far more precise than the bound
        assert float((total - 1).abs().max()) <= bound
