"""The streamed engines' sampled agreement check: exact autograd on a sample of tokens and rows.

Its slow twin is the full reference (`gradlens.grads.autograd_reference`, [M, V] under
autograd): on small float64 batches the sampled values must equal the full ones at the sampled
entries to rounding, for losses that couple tokens (gspo's sequence ratio, seq-mean
aggregation), with the entropy bonus and with the distillation term, whose gradients are not
of the c-form. And the check must fail when the engine is wrong.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import random_batch, with_teacher
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.compare import streamed as streamed_module
from gradlens.compare.sampled_check import (
    DistillInputs,
    choose_sample,
    choose_sample_parallel,
    sampled_reference,
)
from gradlens.config import build_config
from gradlens.containers import valid_index
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import rel_err
from gradlens.engine.collectives import Collectives
from gradlens.engine.launch import run_ranks
from gradlens.engine.vocab_split import VocabSplit
from gradlens.grads import autograd_reference
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.losses.base import Distill
from gradlens.losses.distill import DIVERGENCES

runner = CliRunner()
CASES = [
    ("reinforce", 0.0, "token_mean"),
    ("ppo_clip", 0.0, "token_mean"),
    ("gspo", 0.0, "seq_mean_token_mean"),
    ("cispo", 0.01, "token_mean"),
    ("sft", 0.1, "seq_mean_token_sum"),
]


@pytest.mark.parametrize(("loss", "entropy_coef", "mode"), CASES)
def test_the_sampled_reference_equals_the_full_one_at_the_samples(loss, entropy_coef, mode):
    # V = 300 > the 32 top and 32 spread rows, so R is a strict subset and ρ_t (the rows
    # outside R) carries part of every normaliser; M = 40 < 64 sampled tokens would pick all,
    # so the token sample is checked on its own below with more tokens.
    batch = random_batch(3, n=8, t=5, v=300, h=7)
    spec, agg = get_loss(loss), Aggregation(mode)
    params = LossParams(entropy_coef=entropy_coef)
    full = autograd_reference(batch, spec, params, agg)
    rows, cols = valid_index(batch.mask)
    hidden, tokens = batch.hidden[rows, cols], batch.tokens[rows, cols]
    norms = full.grad_weight.norm(dim=1)
    sample = choose_sample(hidden, batch.weight, tokens, full.coefficient[rows, cols].abs(), norms)
    assert 32 <= sample.rows.numel() < 300
    ref = sampled_reference(sample, batch, hidden, tokens, rows, cols, spec, params, agg)
    # float64 on both sides; the sampled path sums the normaliser in two parts (R and the
    # rest), the full one in one: a few ulps of log-normalisers of ~log 300, amplified by at
    # most the ratio's exponential, stay far below 1e-12 relative.
    torch.testing.assert_close(ref.coefficient, full.coefficient, rtol=1e-12, atol=1e-14)
    full_at_y = full.grad_logits.gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(ref.grad_at_y, full_at_y[sample.tokens], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref.row_norms, norms[sample.rows], rtol=1e-12, atol=1e-14)
    assert ref.non_finite == 0


DISTILL_CASES = [
    (div, form, stored, clamp)
    for div in DIVERGENCES
    for form, stored in (("full", False), ("top_k", False), ("top_k", True))
    for clamp in (None, -4.0)
]


@pytest.mark.parametrize(("div", "form", "stored", "clamp"), DISTILL_CASES)
def test_the_sampled_reference_carries_the_distillation_term(div, form, stored, clamp):
    # The same twin with loss.distill: D_t's entries on R differentiated, those outside R
    # through lse_t with the constant Ψ_t (sampled_check's docstring). verl's clamp at −4 holds
    # some entries at V = 300 (most log π lie below it), where the gradient is 0.
    batch = with_teacher(random_batch(3, n=8, t=5, v=300, h=7), 3, stored=stored)
    spec, agg = get_loss("ppo_clip"), Aggregation("seq_mean_token_mean")
    d = Distill(divergence=div, form=form, top_k=6, coef=0.7, beta=0.4, log_prob_min_clamp=clamp)
    params = LossParams(distill=d)
    full = autograd_reference(batch, spec, params, agg)
    without = autograd_reference(batch, spec, LossParams(), agg)
    rows, cols = valid_index(batch.mask)
    hidden, tokens = batch.hidden[rows, cols], batch.tokens[rows, cols]
    norms = full.grad_weight.norm(dim=1)
    assert batch.teacher is not None
    inputs = DistillInputs(d, batch.teacher, rows, cols)
    c_abs = full.coefficient[rows, cols].abs()
    sample = choose_sample(hidden, batch.weight, tokens, c_abs, norms, inputs)
    ref = sampled_reference(sample, batch, hidden, tokens, rows, cols, spec, params, agg)
    # float64, as above; the term moves the row norms by O(1), so a missing or wrong term fails
    assert not torch.allclose(norms, without.grad_weight.norm(dim=1), rtol=1e-3)
    full_at_y = full.grad_logits.gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(ref.grad_at_y, full_at_y[sample.tokens], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref.row_norms, norms[sample.rows], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref.coefficient, full.coefficient, rtol=1e-12, atol=1e-14)


def test_the_token_sample_is_spread_and_includes_the_largest_coefficient():
    batch = random_batch(5, n=30, t=6, v=40, h=5)
    rows, cols = valid_index(batch.mask)
    m = rows.numel()
    assert m > 64
    c_abs = torch.zeros(m, dtype=torch.float64)
    c_abs[m - 2] = 1.0  # not on the evenly spaced grid's last point (m − 1)
    sample = choose_sample(
        batch.hidden[rows, cols], batch.weight, batch.tokens[rows, cols], c_abs, torch.ones(40)
    )
    assert int(sample.tokens[0]) == 0 and int(sample.tokens[-1]) == m - 1
    assert m - 2 in sample.tokens.tolist()
    assert sample.tokens.numel() in (64, 65)


def streamed_run(**overrides):
    sets = [
        "diagnostics.engine=streamed",
        "diagnostics.memory_budget_mib=64",
        "diagnostics.vocab_chunk=512",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    return run_compare(build_config(None, sets))


@pytest.mark.slow
def test_a_streamed_run_checks_a_sample_by_default():
    report = streamed_run()
    for r in report.losses:
        a = r.agreement
        assert a.ran and a.scope == "sampled" and a.passed
        assert a.sampled_tokens is not None and a.sampled_rows is not None
        assert a.grad_weight is not None and a.grad_weight <= a.tolerance
    assert {c.loss for c in report.checks if c.name == "agreement"} == {
        r.name for r in report.losses
    }


@pytest.mark.slow
def test_the_sampled_check_fails_when_the_engine_is_wrong(monkeypatch):
    real = streamed_module.lm_head_pass

    def off_by_a_percent(*args, **kwargs):
        result = real(*args, **kwargs)
        rows = [dataclasses.replace(r, norms=r.norms * 1.01) for r in result.rows]
        return dataclasses.replace(result, rows=rows)

    monkeypatch.setattr(streamed_module, "lm_head_pass", off_by_a_percent)
    report = streamed_run()
    assert not report.passed
    for r in report.losses:
        # 1% on every row norm against a float32 tolerance of 1e-4, measured against each
        # row's terms, which are at least the row norm itself: at most 0.01, and far above 1e-4
        assert 10 * r.agreement.tolerance < r.agreement.grad_weight <= 0.01 * (1 + 1e-6)
        assert not r.agreement.passed


@pytest.mark.slow
def test_reference_none_still_skips_the_check():
    report = streamed_run(**{"diagnostics.reference": "none"})
    assert all(not r.agreement.ran for r in report.losses)
    assert not any(c.name == "agreement" for c in report.checks)


@pytest.mark.slow
def test_check_on_a_streamed_run_includes_the_agreement_gate():
    result = runner.invoke(
        app, ["compare", "--engine", "streamed", "--check", "-f", "json", "--losses", "ppo_clip"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = [(c["name"], c["loss"]) for c in report["checks"]]
    assert ("agreement", "ppo_clip") in names


# --- under tensor parallelism: the sample, W_R and the constants gathered ------------------------


def parallel_sampled_ranks(rank: int, world: int, batch, sizes: list[int]) -> list:
    """Every case's sampled reference on this rank, from its rows of W alone."""
    split = VocabSplit.from_sizes(sizes)
    comm = Collectives()
    rows, cols = valid_index(batch.mask)
    hidden, tokens = batch.hidden[rows, cols], batch.tokens[rows, cols]
    shard = dataclasses.replace(batch, weight=split.weight_shard(batch.weight, rank).clone())
    out = []
    for loss, entropy_coef, mode in CASES:
        c_abs, norms = full_inputs(batch, loss, entropy_coef, mode)
        sample = choose_sample_parallel(hidden, shard.weight, tokens, c_abs, norms, comm, split)
        spec, agg = get_loss(loss), Aggregation(mode)
        params = LossParams(entropy_coef=entropy_coef)
        out.append(sampled_reference(sample, shard, hidden, tokens, rows, cols, spec, params, agg))
    return out


def full_inputs(batch, loss: str, entropy_coef: float, mode: str):
    """|c_t| and the [V] row norms the sample is chosen from (the full reference's)."""
    full = autograd_reference(
        batch, get_loss(loss), LossParams(entropy_coef=entropy_coef), Aggregation(mode)
    )
    rows, cols = valid_index(batch.mask)
    return full.coefficient[rows, cols].abs(), full.grad_weight.norm(dim=1)


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
@pytest.mark.parametrize("sizes", [[150, 150], [7, 200, 93]], ids=["world2", "world3-uneven"])
def test_the_sampled_reference_on_ranks_equals_one_process(sizes):
    # the batch of the test above (V = 300, R a strict subset of the rows); every rank returns
    # the single-process sampled reference: c_t, ∂L/∂z_y of the sampled tokens, ‖∂L/∂W_v‖ of R
    batch = random_batch(3, n=8, t=5, v=300, h=7)
    launched = run_ranks(parallel_sampled_ranks, len(sizes), (batch, sizes), timeout_s=120)
    rows, cols = valid_index(batch.mask)
    hidden, tokens = batch.hidden[rows, cols], batch.tokens[rows, cols]
    for i, (loss, entropy_coef, mode) in enumerate(CASES):
        c_abs, norms = full_inputs(batch, loss, entropy_coef, mode)
        sample = choose_sample(hidden, batch.weight, tokens, c_abs, norms)
        spec, agg = get_loss(loss), Aggregation(mode)
        params = LossParams(entropy_coef=entropy_coef)
        one = sampled_reference(sample, batch, hidden, tokens, rows, cols, spec, params, agg)
        for results in launched:
            got = results[i]
            # float64; the normalisers are summed over other parts (ranks, R, the sampled
            # entry): a few ulps, as in the test above
            torch.testing.assert_close(got.coefficient, one.coefficient, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got.grad_at_y, one.grad_at_y, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got.row_norms, one.row_norms, rtol=1e-12, atol=1e-14)
            assert got.non_finite == one.non_finite == 0


@pytest.mark.parametrize("loss", ["reinforce", "ppo_clip"])
def test_the_sampled_reference_holds_below_the_float32_exponential_floor(loss):
    # float32 logits spread over hundreds of nats: most exp(z − max) lie below e^−87, where the
    # constant pass takes them at the floor (gradlens.logits.floored_exp) and autograd's
    # log_softmax takes the subnormal or 0. Every sum holds the maximum's 1, so the floor moves
    # it by < V·e^−87 ≈ 5e-36, invisible in float32: what is left is float32 rounding, c_t and
    # ∂L/∂z_y to a few u, the row norms to more (sums of ~30 tokens' c·(e_y − π)·h that cancel,
    # formed by the full reference's GEMM in an order of its own: 1.8e-5 seen), all within the
    # float32 agreement tolerance the report applies.
    batch = random_batch(4, n=8, t=5, v=300, h=7, dtype=torch.float32, logit_scale=150.0)
    rows, cols = valid_index(batch.mask)
    hidden, tokens = batch.hidden[rows, cols], batch.tokens[rows, cols]
    z = hidden @ batch.weight.T
    assert float((z - z.amax(-1, keepdim=True) < -87.0).float().mean()) > 0.5
    spec, agg, params = get_loss(loss), Aggregation("token_mean"), LossParams()
    full = autograd_reference(batch, spec, params, agg)
    norms = full.grad_weight.norm(dim=1)
    sample = choose_sample(hidden, batch.weight, tokens, full.coefficient[rows, cols].abs(), norms)
    ref = sampled_reference(sample, batch, hidden, tokens, rows, cols, spec, params, agg)
    assert ref.non_finite == 0
    tol = tolerances.agreement(torch.float32)
    torch.testing.assert_close(ref.coefficient, full.coefficient, rtol=1e-5, atol=1e-7)
    full_at_y = full.grad_logits.gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(ref.grad_at_y, full_at_y[sample.tokens], rtol=1e-5, atol=1e-7)
    assert rel_err(ref.row_norms, norms[sample.rows]) <= tol
