"""The model source's mismatch switches, measured on the built-in tiny model.

Each switch picks one of two passes that compute the same log-probs in exact arithmetic
(gradlens.sources.passes). In float64 the two agree to rounding: a forward of the tiny model is
a few hundred float64 operations per log-prob, each off by ≤ 2⁻⁵³ ≈ 1.1e-16 relative, on values
of size ≤ 20: ≤ ~1e-13 in all, so 1e-12 is a bound that a real difference in what is computed
(a padding token attended to, a position shifted) exceeds by orders of magnitude. In bfloat16
(8 bits of mantissa, 2⁻⁸ ≈ 4e-3 relative per rounding) the two passes round differently and
their log-probs must differ: by more than 1e-4 nats somewhere, 1e8 times the float64 level
(measured on this batch: up to 0.06 nats between the cache and the full forward, 0.05 between
a sequence scored alone and in its batch).
"""

from __future__ import annotations

import pytest
import torch

from gradlens.compare import run_compare
from gradlens.config import build_config
from gradlens.errors import GradlensError
from gradlens.grads import policy_pass
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import final_hidden, head_weight
from gradlens.sources.passes import full_sequence_logp, score_alone
from gradlens.sources.prompts import choose_prompts, tokenize_prompts
from gradlens.sources.rollout import sample, stop_tokens

CPU = torch.device("cpu")
ROUNDING = 1e-12  # float64: the two passes agree to rounding (module docstring)
BF16_APART = 1e-4  # bfloat16: the two passes round apart (module docstring)


def passes(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The four log-probs of 8 sampled completions of the built-in model in ``dtype``."""
    loaded = load_checkpoint(None, CPU, dtype)
    prompts, key = choose_prompts(None, 4, 0)
    ids = tokenize_prompts(prompts, key, loaded, 16)
    gen = torch.Generator().manual_seed(0)
    rollout = sample(
        loaded.model, loaded.tokenizer, ids, 2, 16, 1.0, 1.0, gen, CPU, stop=stop_tokens(loaded)
    )
    seqs = rollout.sequences
    with torch.no_grad():
        hidden = final_hidden(loaded.model, seqs, 1.0, loaded.bias)
        batch = policy_pass(hidden, head_weight(loaded.model), seqs.tokens, seqs.loss_mask).logp
    mask = seqs.loss_mask
    return {
        "cache": rollout.rollout_logp[mask].double(),
        "full": full_sequence_logp(loaded.model, seqs, 1.0)[mask].double(),
        "batch": batch[mask].double(),
        "alone": score_alone(loaded.model, seqs, 1.0, loaded.bias)[mask].double(),
    }


def gap(logp: dict[str, torch.Tensor], a: str, b: str) -> float:
    return float((logp[a] - logp[b]).abs().max())


@pytest.fixture(scope="module")
def float64() -> dict[str, torch.Tensor]:
    return passes(torch.float64)


@pytest.fixture(scope="module")
def bfloat16() -> dict[str, torch.Tensor]:
    return passes(torch.bfloat16)


@pytest.mark.slow
def test_in_float64_each_pair_agrees_to_rounding(float64: dict[str, torch.Tensor]) -> None:
    assert float64["cache"].dtype == torch.float64 and float64["cache"].numel() > 50
    assert gap(float64, "cache", "full") <= ROUNDING  # the KV-cache switch
    assert gap(float64, "alone", "batch") <= ROUNDING  # the batch-composition switch
    assert gap(float64, "full", "batch") <= ROUNDING  # the same model: the same log-probs


def test_in_bfloat16_each_switch_changes_the_log_probs(bfloat16: dict[str, torch.Tensor]) -> None:
    assert gap(bfloat16, "cache", "full") > BF16_APART
    assert gap(bfloat16, "alone", "batch") > BF16_APART


def model_config(*overrides: str):
    base = [
        "source.kind=model",
        "source.num_prompts=1",
        "source.group_size=2",
        "source.max_new_tokens=6",
        "source.stale.steps=0",
        "losses=[reinforce]",
    ]
    return build_config(None, [*base, *overrides])


@pytest.mark.parametrize(
    "switches", [[], ["source.rollout_logprobs=full", "source.train_pass=alone"]]
)
def test_float64_everywhere_leaves_no_gap(switches: list[str]) -> None:
    """dtype and rollout dtype float64: whichever passes are compared, Δ ≈ 0 in the report."""
    report = run_compare(model_config("dtype=float64", "source.rollout_dtype=float64", *switches))
    assert report.mismatch is not None and report.mismatch.statistics.count > 0
    worst = report.mismatch.worst[0]
    assert abs(worst.log_diff) <= ROUNDING
    stats = report.mismatch.statistics
    # k2 = ½Δ² directly; k3 = e^Δ − 1 − Δ cancels, so it keeps e^Δ's rounding (1.1e-16)
    assert stats.k2_kl is not None and stats.k2_kl <= ROUNDING**2
    assert stats.k3_kl is not None and abs(stats.k3_kl) <= 1e-15
    assert ("full-sequence forward" in report.batch.source) == bool(switches)
    assert ("scored sequence by sequence" in report.batch.source) == bool(switches)


@pytest.mark.parametrize(
    ("key", "value"), [("rollout_logprobs", "incremental"), ("train_pass", "chunked")]
)
def test_a_bad_switch_names_the_field(key: str, value: str) -> None:
    with pytest.raises(GradlensError, match=key):
        model_config(f"source.{key}={value}")
