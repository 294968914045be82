"""gradlens.summation and the softmax normaliser of gradlens.logits: the orders and the bounds
the zero-sum tolerances rest on (gradlens/diagnostics/tolerances.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.logits import log_probs, merge, normaliser
from gradlens.summation import Cascade, PairwiseSum, chunked_depth, depth, pairwise_sum

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
