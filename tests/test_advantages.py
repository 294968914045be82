"""Rewards to advantages (gradlens.advantages): every normalisation against its formula."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import F64, build_batch

from gradlens.config import validate
from gradlens.containers import Batch

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
