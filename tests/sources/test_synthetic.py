"""The seeded synthetic source: determinism, the entropy target, drift, shapes, and the
rollout and reference policies it can draw."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import F64, build_batch

from gradlens.compare import run_compare
from gradlens.config import Config, validate
from gradlens.containers import Batch
from gradlens.grads import effective_old_logp, softmax_view, token_inputs

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_synthetic_source_without_rollout_and_reference_policies_is_unchanged() -> None:
    base = Config()
    batch = build_batch(base, torch.device("cpu"), torch.float32)
    assert batch.rollout_logp is None and batch.ref_logp is None
    same = validate({"source": {"rollout_drift": None, "ref_drift": None}})
    again = build_batch(same, torch.device("cpu"), torch.float32)
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.old_logp, again.old_logp)
    # a reference policy is drawn last: nothing else changes
    with_ref = build_batch(
        validate({"source": {"ref_drift": 0.5}}), torch.device("cpu"), torch.float32
    )
    assert torch.equal(with_ref.tokens, batch.tokens)
    assert torch.equal(with_ref.old_logp, batch.old_logp)
    assert with_ref.ref_logp is not None and with_ref.rollout_logp is None


@pytest.mark.slow
def test_synthetic_rollout_policy_samples_the_tokens() -> None:
    config = validate(
        {"source": {"vocab_size": 64, "rollout_drift": 0.2, "drift": {"kind": "none"}}}
    )
    batch = build_batch(config, torch.device("cpu"), torch.float64)
    assert batch.rollout_logp is not None
    m = batch.mask
    gap = (batch.old_logp - batch.rollout_logp)[m]
    assert 0 < float(gap.abs().mean()) < 0.2  # a small, non-zero training–inference gap
    assert bool((batch.rollout_logp[m] <= 0).all())
    report = run_compare(config)
    assert report.rollout is not None and report.rollout.kl_k1 is not None
