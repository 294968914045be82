"""The batch sources: the seeded synthetic source and the literal source."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from helpers import F64, PI, build_batch, literal_config

from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.grads import effective_old_logp, softmax_view, token_inputs
from gradlens.logits import compute_logits

CPU = torch.device("cpu")


def synthetic(dtype: torch.dtype = F64, seed: int = 0, **source: Any) -> Batch:
    base = {
        "num_sequences": 8,
        "group_size": 4,
        "min_length": 2,
        "max_length": 9,
        "vocab_size": 50,
        "hidden_size": 12,
    }
    advantage = source.pop("advantage", {})
    config = validate({"seed": seed, "source": {**base, **source}, "advantage": advantage})
    return build_batch(config, CPU, dtype)


def tensors(batch: Batch) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(batch, f.name)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("drift", ["none", "logit_noise", "stale_weight"])
def test_synthetic_is_deterministic_for_a_seed(drift: str) -> None:
    a = synthetic(seed=7, drift={"kind": drift})
    b = synthetic(seed=7, drift={"kind": drift})
    for name, x in tensors(a).items():
        assert torch.equal(x, tensors(b)[name]), name
    c = synthetic(seed=8, drift={"kind": drift})
    assert not torch.equal(a.hidden, c.hidden) and not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("target", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_mean_entropy_hits_the_target(target: float, seed: int) -> None:
    # Tolerance 1e-4 nats: the bisection stops at relative 1e-6 in the scale α, and evaluates
    # the entropy in float32 (rounding ~1e-6 of H); |dH/d log α| is O(1) here, so the float64
    # batch lands within ~1e-6 of the target. A scale or target bug is off by ≫ 1e-2.
    batch = synthetic(seed=seed, entropy=target, vocab_size=64)
    view = softmax_view(batch)
    assert float(view.entropy.mean()) == pytest.approx(target, abs=1e-4)


def test_synthetic_temperature_scales_the_logits() -> None:
    # Same seed, temperature 1 vs 0.5: W doubles exactly (division by a power of two).
    a = synthetic(entropy=None, temperature=1.0)
    b = synthetic(entropy=None, temperature=0.5)
    assert torch.equal(b.weight, 2 * a.weight)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_synthetic_drift_none_gives_ratio_exactly_one(dtype: torch.dtype) -> None:
    # drift none marks every position on-policy: the losses see ℓ_old = ℓ bit for bit,
    # whatever GEMM shape computed ℓ (checked over many seeds).
    for seed in range(20):
        batch = synthetic(dtype, seed=seed, drift={"kind": "none"})
        view = softmax_view(batch)
        m = batch.mask
        assert batch.on_policy is not None and torch.equal(batch.on_policy, m)
        assert torch.equal(view.logp[m], effective_old_logp(batch, view.logp)[m]), seed
        inputs = token_inputs(batch, view.logp)
        assert torch.equal(inputs.logp[m], inputs.old_logp[m]), seed


def test_synthetic_drift_none_ratio_is_one_to_rounding_in_float64() -> None:
    # Whatever the GEMM order, r differs from 1 by a few float64 ulps of ℓ at most.
    for seed in range(20):
        batch = synthetic(F64, seed=seed, drift={"kind": "none"})
        r = torch.exp(softmax_view(batch).logp - batch.old_logp)[batch.mask]
        assert float((r - 1).abs().max()) <= 1e-13


@pytest.mark.parametrize("drift", ["logit_noise", "stale_weight"])
def test_synthetic_drift_moves_the_ratio(drift: str) -> None:
    batch = synthetic(seed=3, drift={"kind": drift, "scale": 1.0})
    log_r = (softmax_view(batch).logp - batch.old_logp)[batch.mask]
    assert float(log_r.abs().max()) > 0.1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_synthetic_shapes_masks_and_lengths(seed: int, dtype: torch.dtype) -> None:
    n, lo, hi, v, h = 8, 3, 7, 40, 5
    batch = synthetic(
        dtype,
        seed=seed,
        min_length=lo,
        max_length=hi,
        vocab_size=v,
        hidden_size=h,
        drift={"kind": "logit_noise"},
    )
    acc = F64 if dtype == F64 else torch.float32
    assert batch.hidden.shape == (n, hi, h) and batch.hidden.dtype == dtype
    assert batch.weight.shape == (v, h) and batch.weight.dtype == dtype
    assert batch.tokens.shape == batch.mask.shape == (n, hi)
    assert batch.old_logp.dtype == acc and batch.advantages.dtype == acc
    assert bool(((batch.tokens >= 0) & (batch.tokens < v)).all())
    lengths = batch.mask.sum(-1)
    assert bool(((lengths >= lo) & (lengths <= hi)).all())
    # Right padding: each row is a prefix of valid tokens.
    assert torch.equal(batch.mask, torch.arange(hi)[None, :] < lengths[:, None])
    assert bool((batch.old_logp[batch.mask] <= 0).all())
    assert bool((batch.advantages[~batch.mask] == 0).all())
    # Outcome reward: one advantage per sequence, the same at each of its tokens.
    adv = batch.advantages
    assert bool(((adv == adv[:, :1]) | ~batch.mask).all())


# ----------------------------------------------------------------------------- advantages


def sequence_advantages(norm: str, rewards: str, seed: int = 0) -> torch.Tensor:
    batch = synthetic(
        seed=seed,
        num_sequences=16,
        group_size=4,
        rewards={"kind": rewards},
        advantage={"normalization": norm},
    )
    return batch.advantages[:, 0]  # position 0 is always valid (min_length ≥ 1)


EPS = 1e-6  # the default advantage.eps


@pytest.mark.parametrize("rewards", ["binary", "gaussian"])
def test_advantages_follow_their_formula_from_the_raw_rewards(rewards: str) -> None:
    # The rewards do not depend on the normalisation (same seed, same generator draws), so
    # "none" exposes R and each other mode must be its formula of R (losses.md §7.1, A2).
    r = sequence_advantages("none", rewards)
    groups = r.view(-1, 4)
    mean_g, std_g = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    expected = {
        "group": ((groups - mean_g) / (std_g + EPS)).reshape(-1),
        "group_mean": (groups - mean_g).reshape(-1),
        "batch": (r - r.mean()) / (r.std() + EPS),
    }
    for norm, value in expected.items():
        assert torch.allclose(sequence_advantages(norm, rewards), value, rtol=1e-12, atol=1e-12)
    if rewards == "binary":
        assert set(r.tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("rewards", ["binary", "gaussian"])
def test_group_advantages_have_mean_zero_and_unit_std(rewards: str) -> None:
    adv = sequence_advantages("group", rewards, seed=1).view(-1, 4)
    raw = sequence_advantages("none", rewards, seed=1).view(-1, 4)
    degenerate = raw.std(-1) == 0  # every reward in the group equal
    if rewards == "binary":
        assert bool(degenerate.any()) and bool((~degenerate).any())  # both kinds exercised
    assert torch.allclose(adv.mean(-1), torch.zeros(4, dtype=F64), atol=1e-12)
    # std = s/(s + eps) with s the group std (≥ 0.5 for binary groups here): 1 within 1e-5.
    assert torch.allclose(adv[~degenerate].std(-1), torch.ones(1, dtype=F64), atol=1e-5)
    assert bool((adv[degenerate] == 0).all())  # no signal from an all-equal group


def test_group_mean_advantages_are_centred_but_not_scaled() -> None:
    adv = sequence_advantages("group_mean", "gaussian").view(-1, 4)
    raw = sequence_advantages("none", "gaussian").view(-1, 4)
    assert torch.allclose(adv.mean(-1), torch.zeros(4, dtype=F64), atol=1e-12)
    assert torch.allclose(adv.std(-1), raw.std(-1), rtol=1e-12)  # no std division (A2)


def test_batch_advantages_have_batch_mean_zero_and_unit_std() -> None:
    adv = sequence_advantages("batch", "gaussian")
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(adv.std()) == pytest.approx(1.0, abs=1e-5)  # s/(s + 1e-6), s ≈ 1


# ----------------------------------------------------------------------------- literal


LOGITS = [2.0, -1.5, 0.25, 3.0]


def literal_batch(dtype: str = "float64") -> Batch:
    sequences = [
        [
            {"logits": LOGITS, "token": 3, "advantage": 1.0, "old_prob": 0.4},
            {"probs": [0.1, 0.2, 0.3, 0.4], "token": 1, "advantage": -0.5},
        ],
        [{"probs": [0.7, 0.1, 0.1, 0.1], "token": 0, "advantage": 2.0, "old_logp": -0.25}],
    ]
    config = literal_config(sequences, ["reinforce"], dtype=dtype)
    return build_batch(config, CPU, {"float64": F64, "float32": torch.float32}[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_literal_hidden_times_weight_is_the_stated_logits(dtype: str) -> None:
    batch = literal_batch(dtype)
    # 2 sequences, padded T = 2, M = 3 positions: h_k = e_k ∈ R^3, W = [z_1 z_2 z_3].
    assert batch.hidden.shape == (2, 2, 3) and batch.weight.shape == (4, 3)
    assert torch.equal(batch.mask, torch.tensor([[True, True], [True, False]]))
    z = compute_logits(batch.hidden[batch.mask], batch.weight)  # [M, V]
    # A one-hot h makes W h an exact column read-out (products by 0 and 1 are exact).
    assert torch.equal(z[0], torch.tensor(LOGITS, dtype=batch.weight.dtype).to(z.dtype))
    assert torch.equal(batch.tokens[batch.mask], torch.tensor([3, 1, 0]))
    assert torch.equal(batch.advantages[batch.mask], torch.tensor([1.0, -0.5, 2.0]).to(z.dtype))


def test_literal_probs_round_trip_through_the_logits() -> None:
    # z = log π, then softmax(z): log, exp and the normalising sum each round once, so π comes
    # back within a few float64 ulps of a number ≤ 1; 1e-15 allows that and nothing more.
    batch = literal_batch()
    view = softmax_view(batch)
    assert torch.allclose(view.probs[1], torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64), atol=1e-15)
    assert torch.allclose(view.probs[2], torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=F64), atol=1e-15)
    # The stated logits: π = softmax(z) by definition.
    assert torch.allclose(
        view.probs[0], torch.softmax(torch.tensor(LOGITS, dtype=F64), -1), atol=1e-15
    )


def test_literal_old_log_probs() -> None:
    batch = literal_batch()
    view = softmax_view(batch)
    assert float(batch.old_logp[0, 0]) == math.log(0.4)  # old_prob → log
    assert float(batch.old_logp[1, 0]) == -0.25  # old_logp as given
    assert float(batch.old_logp[0, 1]) == float(view.logp[0, 1])  # on-policy: bit for bit


def test_literal_matches_the_test_vector_distribution() -> None:
    # losses.md §12: z = log π for π = [0.5, 0.2, 0.15, 0.1, 0.05]; ℓ(y = 0) = log 0.5.
    config = literal_config([[{"probs": PI, "token": 0, "advantage": 1.0}]], ["reinforce"])
    view = softmax_view(build_batch(config, CPU, F64))
    assert float(view.logp[0, 0]) == pytest.approx(-math.log(2.0), abs=1e-15)
