"""The streamed lm_head engine against the materialised closed form and a float64 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import build_batch

from gradlens.config import validate
from gradlens.engine.streamed import EnginePlan, lm_head_pass, plan
from gradlens.grads import closed_form, objective, on_grid, softmax_view, token_inputs
from gradlens.losses import Aggregation, LossParams, aggregation_weights, get_loss

NAMES = ["reinforce", "ppo", "ppo_clip", "sft"]
PARAMS = LossParams(eps_high=0.1, eps_low=0.1)  # narrow clip: ppo_clip differs from ppo often


def setup(dtype: torch.dtype, vocab: int = 1500):
    cfg = validate({"source": {"vocab_size": vocab, "num_sequences": 8, "max_length": 24}})
    batch = build_batch(cfg, torch.device("cpu"), dtype)
    view = softmax_view(batch)

    def coefficients(logp: torch.Tensor) -> list[torch.Tensor]:
        grid = torch.zeros(batch.mask.shape, dtype=logp.dtype)
        grid[view.rows, view.cols] = logp
        inp = token_inputs(batch, grid)
        w = aggregation_weights(batch.mask, "token_mean", None, logp.dtype)
        grads = [w * get_loss(n).fn(inp, PARAMS).per_token_grad for n in NAMES]
        return [g[view.rows, view.cols] for g in grads]

    return batch, view, coefficients


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize(
    "engine_plan",
    [
        EnginePlan(vocab_chunk=256, resident=0),
        EnginePlan(vocab_chunk=256, resident=3),
        EnginePlan(vocab_chunk=4096, resident=1),
        EnginePlan(vocab_chunk=333, resident=99),
    ],
    ids=["streamed", "partly-resident", "one-chunk", "odd-chunks"],
)
def test_float64_engine_equals_the_closed_form(engine_plan):
    batch, view, coefficients = setup(torch.float64)
    res = lm_head_pass(view.hidden, batch.weight, view.tokens, coefficients, engine_plan)
    # float64 throughout; only the summation order differs: 1e-12 is ~5000 ulps.
    assert torch.allclose(res.tokens.logp, view.logp[view.rows, view.cols], rtol=0, atol=1e-12)
    assert torch.allclose(res.tokens.entropy, view.entropy, rtol=0, atol=1e-12)
    assert torch.allclose(res.tokens.prob_sum, torch.ones_like(res.tokens.prob_sum), atol=1e-12)
    for name, rows in zip(NAMES, res.rows, strict=True):
        ref = closed_form(batch, view, get_loss(name), PARAMS, Aggregation())
        assert normwise(rows.norms, ref.grad_weight.norm(dim=1)) < 1e-12, name
        assert float(rows.row_sum.norm()) < 1e-12 * float(ref.grad_weight.norm())  # zero-sum
        other = ref.grad_logits.scatter(-1, view.tokens[:, None], 0.0)
        c = ref.coefficient[view.rows, view.cols]
        # max_{j≠y} π_j times |c_t| is the largest other-row entry of ∂L/∂z_t
        expect = other.abs().amax(-1)
        assert torch.allclose(c.abs() * res.tokens.max_other_prob, expect, atol=1e-15)


def test_dense_product_is_shared_between_losses_that_differ_on_few_tokens():
    batch, view, coefficients = setup(torch.float64)
    res = lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        coefficients,
        EnginePlan(vocab_chunk=512, resident=0),
    )
    # 2 logits GEMMs + 4 losses; ppo_clip reuses ppo's product, so strictly fewer than 2 + 4
    clipped = float((res.coefficients[2] != res.coefficients[1]).double().mean())
    assert 0 < clipped < 0.5
    assert res.gemm_equivalents == pytest.approx(2 + 3 + clipped)


@pytest.mark.parametrize("c_h", [0.01, 0.1])
@pytest.mark.parametrize(
    "engine_plan",
    [EnginePlan(vocab_chunk=256, resident=0), EnginePlan(vocab_chunk=333, resident=2)],
    ids=["streamed", "partly-resident"],
)
def test_float64_engine_with_the_entropy_bonus_equals_the_closed_form(engine_plan, c_h):
    """The bonus a_t·c_H·π(log π + H) joins every loss's rows, ppo_clip's shared dense product
    included, but not a difference of two losses (a parity set), in which it cancels."""
    batch, view, coefficients = setup(torch.float64)
    a = aggregation_weights(batch.mask, "token_mean", None, torch.float64)[view.rows, view.cols]

    def with_difference(logp: torch.Tensor) -> list[torch.Tensor]:
        cs = coefficients(logp)
        return [*cs, cs[2] - cs[1]]  # ppo_clip − ppo: c-form, without the bonus

    res = lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        with_difference,
        engine_plan,
        entropy_weight=c_h * a,
        entropy_losses=len(NAMES),
    )
    params = dataclasses.replace(PARAMS, entropy_coef=c_h)
    refs = [closed_form(batch, view, get_loss(n), params, Aggregation()) for n in NAMES]
    assert res.tokens.entropy_grad_at_y is not None and res.tokens.entropy_grad_sum is not None
    assert refs[0].entropy_grad_logits is not None
    e_y = refs[0].entropy_grad_logits.gather(-1, view.tokens[:, None]).squeeze(-1)
    assert torch.allclose(res.tokens.entropy_grad_at_y, e_y, rtol=0, atol=1e-15)
    assert float(res.tokens.entropy_grad_sum.abs().max()) < 1e-15  # Σ_v π(log π + H) = 0
    for name, rows, ref in zip(NAMES, res.rows[: len(NAMES)], refs, strict=True):
        assert normwise(rows.norms, ref.grad_weight.norm(dim=1)) < 1e-12, name
        assert float(rows.row_sum.norm()) < 1e-12 * float(ref.grad_weight.norm())  # zero-sum
        other = ref.grad_logits.scatter(-1, view.tokens[:, None], 0.0).abs()
        assert rows.other_mass is not None and rows.other_max is not None
        assert torch.allclose(rows.other_mass, other.sum(-1), rtol=1e-12, atol=0), name
        assert torch.allclose(rows.other_max, other.amax(-1), rtol=1e-12, atol=0), name
    diff = refs[2].grad_weight - refs[1].grad_weight
    assert normwise(res.rows[-1].norms, diff.norm(dim=1)) < 1e-12
    assert res.rows[-1].other_mass is None
    # ppo_clip still reuses ppo's dense product; the bonus costs one more GEMM in pass 2
    clipped = float((res.coefficients[2] != res.coefficients[1]).double().mean())
    assert 0 < clipped < 0.5
    base = lm_head_pass(view.hidden, batch.weight, view.tokens, with_difference, engine_plan)
    assert res.gemm_equivalents == pytest.approx(base.gemm_equivalents + 1)
    assert base.tokens.entropy_grad_at_y is None and base.rows[0].other_mass is None


def test_float32_row_norms_match_a_float64_reference():
    batch32, view32, coefficients = setup(torch.float32)
    # The float64 reference of the same problem: the float32 inputs, upcast exactly.
    batch64 = dataclasses.replace(
        batch32,
        hidden=batch32.hidden.double(),
        weight=batch32.weight.double(),
        old_logp=batch32.old_logp.double(),
        advantages=batch32.advantages.double(),
    )
    view64 = softmax_view(batch64)
    res = lm_head_pass(
        view32.hidden,
        batch32.weight,
        view32.tokens,
        coefficients,
        plan(
            view32.hidden.shape[0], batch32.vocab_size, batch32.hidden_size, 4, budget_bytes=2**20
        ),
    )
    for name, rows in zip(NAMES, res.rows, strict=True):
        ref = closed_form(batch64, view64, get_loss(name), PARAMS, Aggregation())
        # float32 logits carry ~|z|·2⁻²⁴ absolute error (|z| ≲ 60 here): 1e-5 normwise.
        assert normwise(rows.norms, ref.grad_weight.norm(dim=1)) < 1e-5, name


def test_plan_respects_the_budget():
    p = plan(tokens=2048, vocab=32000, hidden=512, losses=3, budget_bytes=100 * 2**20)
    per_row = 4 * (3 * 2048 + 2 * 3 * 512)
    assert p.vocab_chunk * per_row + p.resident * p.vocab_chunk * 2048 * 4 <= 100 * 2**20
    assert plan(2048, 32000, 512, 3, budget_bytes=0).resident == 0


def test_plan_counts_the_entropy_bonus_buffer():
    """With the bonus a chunk holds a fourth [M, Vc] buffer, and the plan budgets for it."""
    budget = 100 * 2**20
    p3 = plan(2048, 32000, 512, 3, budget_bytes=budget)
    p4 = plan(2048, 32000, 512, 3, budget_bytes=budget, buffers=4)
    per_row = 4 * (4 * 2048 + 2 * 3 * 512)
    assert p4.vocab_chunk * per_row + p4.resident * p4.vocab_chunk * 2048 * 4 <= budget
    assert (p4.vocab_chunk, p4.resident) != (p3.vocab_chunk, p3.resident)


SELECTED = ["ppo_clip", "aspo", "gspo"]  # a token loss, one that reads H_t, a sequence loss


def selection_problem(c_h: float):
    """The float64 batch with the top-entropy selection (ρ = 0.4) and aspo, whose coefficients
    read the entropies the engine hands over, and the bonus's weight as a function of them."""
    batch, view, _ = setup(torch.float64)
    params = dataclasses.replace(PARAMS, top_entropy_quantile=0.4, entropy_coef=c_h)
    seen: list[torch.Tensor] = []

    def coefficients(logp: torch.Tensor, entropy: torch.Tensor) -> list[torch.Tensor]:
        seen.append(entropy)
        grid = on_grid(logp, view.rows, view.cols, batch.mask.shape)
        h = on_grid(entropy, view.rows, view.cols, batch.mask.shape)
        objs = [objective(batch, grid, get_loss(n), params, Aggregation(), h) for n in SELECTED]
        return [o.coefficient[view.rows, view.cols] for o in objs]

    a = aggregation_weights(batch.mask, "token_mean", None, torch.float64)[view.rows, view.cols]

    def bonus(entropy: torch.Tensor) -> torch.Tensor:  # c_H·a_t·S_t from the same H_t
        keep = entropy >= torch.quantile(entropy, 1 - params.top_entropy_quantile)
        return c_h * a * keep.to(a.dtype)

    return batch, view, params, coefficients, bonus, seen


@pytest.mark.parametrize("c_h", [0.0, 0.05])
def test_float64_engine_hands_pass_one_entropies_to_the_losses(c_h):
    """``token_entropy``: pass 1 computes H_t (without the bonus too), the losses get it with the
    log-probs, and the bonus's weight may be a function of it: the rows equal the closed form
    of the selection and of aspo, whose coefficients depend on H_t."""
    batch, view, params, coefficients, bonus, seen = selection_problem(c_h)
    engine_plan = EnginePlan(vocab_chunk=333, resident=1)
    res = lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        coefficients,
        engine_plan,
        entropy_weight=bonus if c_h else None,
        token_entropy=True,
    )
    # float64, only the summation order differs: 1e-12 is ~5000 ulps
    assert len(seen) == 1 and torch.allclose(seen[0], view.entropy, rtol=0, atol=1e-12)
    for name, rows in zip(SELECTED, res.rows, strict=True):
        ref = closed_form(batch, view, get_loss(name), params, Aggregation())
        assert bool(ref.terms.regions["entropy_masked"].any()), name  # the selection acts
        assert normwise(rows.norms, ref.grad_weight.norm(dim=1)) < 1e-12, name
    assert (res.tokens.entropy_grad_at_y is None) == (c_h == 0.0)
