"""The literal source: hand-written positions become the stated logits, log-probs and
policies."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from helpers import F64, PI, build_batch, literal_config

from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.errors import GradlensError
from gradlens.grads import softmax_view, token_inputs
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


def test_literal_source_states_rollout_and_reference() -> None:
    config = validate(
        {
            "dtype": "float64",
            "losses": ["reinforce"],
            "source": {
                "kind": "literal",
                "sequences": [
                    {
                        "positions": [
                            {"probs": [0.5, 0.5], "token": 0, "old_prob": 0.4},
                            {"probs": [0.5, 0.5], "token": 1, "rollout_logp": -1.0},
                        ]
                    },
                    {"positions": [{"probs": [0.5, 0.5], "token": 0, "ref_prob": 0.25}]},
                ],
            },
        }
    )
    batch = build_batch(config, torch.device("cpu"), torch.float64)
    assert batch.rollout_logp is not None and batch.ref_logp is not None
    # stated where given, π_old(y) elsewhere
    assert float(batch.rollout_logp[0, 1]) == -1.0
    assert float(batch.rollout_logp[0, 0]) == pytest.approx(math.log(0.4))
    assert float(batch.ref_logp[1, 0]) == pytest.approx(math.log(0.25))
    assert float(batch.ref_logp[0, 0]) == pytest.approx(math.log(0.4))
    inputs = token_inputs(batch, softmax_view(batch).logp)
    assert inputs.rollout_logp is not None and inputs.ref_logp is not None
    with pytest.raises(GradlensError, match="at most one of rollout_prob and rollout_logp"):
        validate(
            {
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {
                            "positions": [
                                {
                                    "probs": [0.5, 0.5],
                                    "token": 0,
                                    "rollout_prob": 0.5,
                                    "rollout_logp": -0.7,
                                }
                            ]
                        }
                    ],
                }
            }
        )
