"""The distillation term (gradlens.losses.distill) through both engines of `compare`: the
streamed engine's rows, sampled-row gradient and loss against the materialized closed form and
against autograd, in float64, for every divergence × form × teacher × aggregation; the
zero-sum check passes in both; the term composes with the entropy bonus under the top-entropy
selection, bypass mode and a renormalising correction, weighted by a_t without S_t; the fused and
vocab-parallel engines refuse the term."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_batch, with_teacher

from gradlens.compare.engines import EngineOptions
from gradlens.compare.materialized import run_materialized
from gradlens.compare.streamed import run_streamed
from gradlens.config import build_config
from gradlens.errors import GradlensError
from gradlens.grads import closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss
from gradlens.losses.base import Distill
from gradlens.losses.corrections import with_defaults
from gradlens.losses.distill import DIVERGENCES, FORMS

# float64: the streamed engine sums over vocabulary chunks in another order than the
# materialized closed form: a few ulps × log2(V) per sum (~1e-15); 1e-11 is wide, a wrong or
# missing term is O(1).
TOL_F64 = 1e-11
SEED = 9
CASES = [
    (div, form, stored)
    for div in DIVERGENCES
    for form in FORMS
    for stored in (False, True)
    if not (form == "full" and stored)
]
LOSSES = ["reinforce", "ppo_clip"]


def setup(stored: bool, div: str, form: str, entropy: float = 0.0):  # type: ignore[no-untyped-def]
    # V = 40 in chunks of 16 (the last one short): the teacher's passes cross chunk borders.
    batch = with_teacher(random_batch(SEED, n=5, t=6, v=40, h=7, drift=0.5), SEED, stored=stored)
    d = Distill(divergence=div, form=form, top_k=5, coef=0.8, beta=0.4)
    return batch, LossParams(distill=d, entropy_coef=entropy)


def options(reference: bool = True) -> EngineOptions:
    """Small chunks; with ``reference`` the full autograd check of every token and row."""
    return EngineOptions(
        reference="full" if reference else "none", vocab_chunk=16, memory_budget_bytes=1 << 20
    )


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("div, form, stored", CASES)
def test_streamed_matches_closed_form_and_autograd(
    div: str, form: str, stored: bool, mode: str
) -> None:
    batch, params = setup(stored, div, form)
    agg = Aggregation(mode, 7.0 if mode.endswith("_norm") else None)
    specs = [get_loss(n) for n in LOSSES]
    stream = run_streamed(batch, specs, params, agg, options(), "test")
    mat = run_materialized(batch, specs, params, agg, options(), "test")
    view = softmax_view(batch)
    for spec, s, m in zip(specs, stream.records, mat.records, strict=True):
        closed = closed_form(batch, view, spec, params, agg)
        assert closed.distill_grad_logits is not None
        assert float(closed.distill_grad_logits.abs().max()) > 1e-4  # the term is there
        assert s.loss == pytest.approx(closed.loss, rel=TOL_F64, abs=TOL_F64)
        assert s.agreement.passed and m.agreement.passed
        assert s.zero_sum.passed and m.zero_sum.passed
        assert s.rows.total_norm == pytest.approx(m.rows.total_norm, rel=TOL_F64)
        assert s.sampled_row.sampled_abs_max == pytest.approx(
            m.sampled_row.sampled_abs_max, rel=TOL_F64
        )
        for key in ("grad_logits", "grad_weight"):  # streamed vs autograd, float64
            assert getattr(s.agreement, key) <= TOL_F64


@pytest.mark.parametrize("div", DIVERGENCES)
def test_streamed_with_entropy_bonus(div: str) -> None:
    batch, params = setup(False, div, "full", entropy=0.05)
    agg = Aggregation("seq_mean_token_mean")
    specs = [get_loss("sft")]
    stream = run_streamed(batch, specs, params, agg, options(), "test")
    mat = run_materialized(batch, specs, params, agg, options(), "test")
    (s,), (m,) = stream.records, mat.records
    assert s.agreement.passed and s.zero_sum.passed
    assert s.loss == pytest.approx(m.loss, rel=TOL_F64)
    assert s.rows.total_norm == pytest.approx(m.rows.total_norm, rel=TOL_F64)


@pytest.mark.parametrize("form", FORMS)
def test_composes_with_selection_bypass_and_prompt_groups(form: str) -> None:
    # The bonus's weights are a_t·S_t (S_t from pass 1's H_t), the distillation term's a_t;
    # in bypass mode the icepop rejection (renormalised) reads sg[π_θ]/μ, so a_t is only known
    # after pass 1; prompt_average reads the batch's groups. Streamed = materialized = autograd.
    batch, params = setup(False, "jsd", form, entropy=0.05)
    gen = torch.Generator().manual_seed(SEED + 100)
    noise = 0.3 * torch.randn(batch.mask.shape, generator=gen, dtype=torch.float64)
    batch = dataclasses.replace(batch, rollout_logp=batch.old_logp - noise)  # log μ
    icepop = with_defaults("icepop", 0.7, 1.4, renormalize=True)
    params = dataclasses.replace(
        params, top_entropy_quantile=0.5, bypass_mode=True, corrections=(icepop,)
    )
    agg = Aggregation("prompt_average")
    specs = [get_loss(n) for n in LOSSES]
    stream = run_streamed(batch, specs, params, agg, options(), "test")
    mat = run_materialized(batch, specs, params, agg, options(), "test")
    view = softmax_view(batch)
    off = dataclasses.replace(params, top_entropy_quantile=1.0)
    for spec, s, m in zip(specs, stream.records, mat.records, strict=True):
        closed = closed_form(batch, view, spec, params, agg)
        assert closed.distill_grad_logits is not None
        selected = closed.bonus_weights != closed.agg_weights
        assert bool(selected.any())  # the selection drops some tokens' bonus
        # the distillation block ignores S_t: the same with the selection off
        unselected = closed_form(batch, view, spec, off, agg).distill_grad_logits
        assert unselected is not None
        assert torch.equal(closed.distill_grad_logits, unselected)
        assert s.loss == pytest.approx(closed.loss, rel=TOL_F64, abs=TOL_F64)
        assert s.agreement.passed and m.agreement.passed
        assert s.zero_sum.passed and m.zero_sum.passed
        assert s.rows.total_norm == pytest.approx(m.rows.total_norm, rel=TOL_F64)
        for key in ("grad_logits", "grad_weight"):  # streamed vs autograd, float64
            assert getattr(s.agreement, key) <= TOL_F64


def test_fused_and_vocab_parallel_refuse_the_term() -> None:
    batch, params = setup(False, "forward_kl", "full")
    with pytest.raises(GradlensError, match=r"loss\.distill runs on the materialized and"):
        run_streamed(
            batch, [get_loss("sft")], params, Aggregation("token_mean"), options(), "t", fused=True
        )
    for override in ("diagnostics.engine=fused", "diagnostics.tensor_parallel=2"):
        with pytest.raises(GradlensError, match=r"loss\.distill"):
            build_config(None, ["loss.distill.divergence=forward_kl", override])


def test_no_distill_changes_nothing() -> None:
    # Without loss.distill the teacher in the batch is never read: same report as without it.
    batch, _ = setup(False, "forward_kl", "full")
    bare = dataclasses.replace(batch, teacher=None)
    agg = Aggregation("token_mean")
    a = run_streamed(batch, [get_loss("ppo")], LossParams(), agg, options(False), "t")
    b = run_streamed(bare, [get_loss("ppo")], LossParams(), agg, options(False), "t")
    assert a.records[0].loss == b.records[0].loss
    assert torch.equal(a.records[0].objective.coefficient, b.records[0].objective.coefficient)
