"""The synthetic source's teacher (`gradlens.sources.synthetic_teacher`): W' and log q(y) against
the construction written out whole, in both constructions (the same teacher for the same W);
the rest of the batch unchanged; no [N, T, V] in the chunked plan; ``gradlens compare`` with
``loss.distill`` from the command line, both engines, ``--check`` passing."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from helpers import build_batch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare.run import source_context
from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.sources import synthetic
from gradlens.sources.synthetic_calibration import VOCAB_BLOCK, spans
from gradlens.sources.synthetic_chunked import stream

F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")
runner = CliRunner()
# 5,000 vocabulary rows: three blocks of the teacher's stream, the last partial.
SOURCE: dict[str, Any] = {"num_sequences": 8, "vocab_size": 5000, "hidden_size": 8}
# float64 throughout: W' written out adds the same float64 numbers (exact); log q(y) written
# out sums exp over V in one logsumexp instead of block by block: a few ulps × log V ≈ 1e-14.
TOL_F64 = 1e-12


def batch(teacher: str = "perturbed", seed: int = 3, **source: Any) -> Batch:
    config = validate(
        {"seed": seed, "dtype": "float64", "source": {**SOURCE, "teacher": teacher, **source}}
    )
    return build_batch(config)


def written_out(b: Batch, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', log q(y) [N, T]) by the module docstring's formulas on whole tensors."""
    w = b.weight.to(F64)
    eps = torch.cat(
        [
            torch.randn(v1 - v0, w.shape[1], generator=stream(seed, "teacher", i), dtype=F32)
            for i, (v0, v1) in enumerate(spans(w.shape[0], VOCAB_BLOCK))
        ]
    ).to(F64)
    std = float(w.std())  # the sample standard deviation of all V·H entries
    w_teacher = w + scale * std * eps
    logq = torch.log_softmax(b.hidden.to(F64) @ w_teacher.T, -1)  # [N, T, V]
    return w_teacher, logq.gather(-1, b.tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunked", [False, True])
def test_teacher_is_the_construction_written_out(
    chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:  # route the batch through the construction in vocabulary blocks
        monkeypatch.setattr(synthetic, "MATERIALIZE_ENTRIES", 0)
    b = batch(teacher_scale=0.1)
    assert b.teacher is not None and b.teacher.weight is not None
    assert ("built in blocks" in b.source) == chunked
    assert b.teacher.hidden is b.hidden  # h' = h: the same tensor, no copy
    w_teacher, logq = written_out(b, 0.1, seed=3)
    # std(W) from block sums vs torch.std: the same sample formula in another order (1e-16
    # relative), times σ·|ε| ≲ 1: W' agrees to a few ulps of |W'|
    assert float((b.teacher.weight - w_teacher).abs().max()) < TOL_F64
    assert b.teacher.sampled_logp is not None
    m = b.mask
    assert float((b.teacher.sampled_logp[m] - logq[m]).abs().max()) < TOL_F64
    assert bool((b.teacher.sampled_logp[~m] == 0).all())
    # σ = 0.1 moves log q(y) from log π(y) by ~0.4 nats on average here: not a copy of the
    # student, not an unrelated distribution (σ = 0.5 moves it by ~7 nats)
    student = torch.log_softmax(b.hidden @ b.weight.T, -1).gather(-1, b.tokens[..., None])
    gap = float((student.squeeze(-1)[m] - logq[m]).abs().mean())
    assert 0.1 < gap < 2.0


@pytest.mark.slow
def test_the_teacher_changes_nothing_else_and_is_seeded() -> None:
    with_teacher, without = batch(), batch("none")
    assert without.teacher is None
    for name in ("hidden", "weight", "tokens", "mask", "old_logp", "advantages"):
        assert torch.equal(getattr(with_teacher, name), getattr(without, name)), name
    again, other = batch(), batch(seed=4)
    assert with_teacher.teacher is not None and again.teacher is not None
    assert other.teacher is not None and with_teacher.teacher.weight is not None
    assert torch.equal(with_teacher.teacher.weight, again.teacher.weight)
    assert not torch.equal(with_teacher.teacher.weight, other.teacher.weight)


def test_the_chunked_plan_holds_no_tokens_by_vocabulary_tensor() -> None:
    # Qwen-sized: V = 151,936, H = 1,024, float32: W' [V, H] in float32 and its float64
    # blocks, 151,936·1,024·(4 + 16) = 3.11e9 bytes are counted, and nothing of size N·T·V.
    config = validate(
        {
            "source": {"vocab_size": 151936, "hidden_size": 1024, "teacher": "perturbed"},
            "diagnostics": {"memory_budget_mib": 64},
        }
    )
    plan = synthetic.plan_synthetic(config.source, source_context(config, CPU))
    assert plan.provides is not None and {"teacher", "teacher_full"} <= plan.provides
    terms = dict(plan.memory[0].terms)
    assert not any("[N, T, V]" in name or "[N·T, V]" in name for name in terms)
    assert terms["the teacher's lm_head W' [V, H] and its float64 blocks"] == 151936 * 1024 * 20


@pytest.mark.parametrize("engine", ["materialized", "streamed"])
@pytest.mark.parametrize(
    "settings",
    [
        ["loss.distill.divergence=forward_kl"],
        ["loss.distill.divergence=reverse_kl", "loss.distill.form=top_k"],
        ["loss.distill.divergence=jsd", "loss.distill.beta=0.3"],
        # verl's clamp: the streamed engine's two passes must keep the same entries bit for
        # bit, or the term's sum over the vocabulary is off by a kept entry's ψ
        ["loss.distill.divergence=jsd", "loss.distill.log_prob_min_clamp=-3", "dtype=float64"],
    ],
    ids=["forward_kl", "reverse_kl_top_k", "jsd", "jsd_clamp"],
)
def test_compare_with_a_synthetic_teacher_from_the_command_line(
    engine: str, settings: list[str]
) -> None:
    sets = [
        "source.vocab_size=300",
        "source.teacher=perturbed",
        "losses=[ppo_clip, opd]",
        *settings,
    ]
    args = [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, ["compare", "-f", "json", "--check", "--engine", engine, *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "teacher perturbed(0.1)" in report["batch"]["source"]
    for loss in report["losses"]:
        assert loss["zero_sum"]["passed"], loss["name"]
        assert math.isfinite(loss["loss"])
    # opd reads the teacher's log q(y): no finding that ℓ_old stands in for it
    opd = next(x for x in report["losses"] if x["name"] == "opd")
    assert not any("no teacher_logp" in f for f in opd["findings"])


def test_distillation_without_a_teacher_is_refused_before_any_work() -> None:
    result = runner.invoke(app, ["compare", "--check", "--set", "loss.distill.coef=1"])
    assert result.exit_code == 2, result.output
    assert "loss.distill needs a teacher" in result.stderr
    assert "source.teacher: perturbed" in result.stderr
