"""Unit tests of gradlens.diagnostics on hand-made inputs, including proof that each pass/fail
check can fail."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import F64, PI, gradients, literal_config, random_batch

from gradlens.compare import run_compare
from gradlens.diagnostics.agreement import agreement
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.ratios import ratio_stats
from gradlens.diagnostics.row_norms import row_norms
from gradlens.diagnostics.zero_sum import zero_sum
from gradlens.grads import autograd_reference, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------- zero_sum


def z_loss_case(dtype: torch.dtype, lam: float = 1e-3):
    """Real ppo_clip gradients, and the same with a z-loss λ·lse² added: its logit gradient
    2λ·lse·π sums to 2λ·lse ≠ 0 per token (losses.md §0, item 5)."""
    batch = random_batch(1, dtype=dtype, logit_scale=3.0)
    view = softmax_view(batch)
    g = gradients(batch, "ppo_clip", LossParams(dual_clip=3.0))
    c = g.coefficient[batch.mask]
    lse = torch.logsumexp(view.logits, -1)  # [M]
    assert float(lse.abs().min()) > 0.1  # so the z-loss term really sums to something
    z_grad = 2 * lam * lse[:, None] * view.probs  # [M, V]
    bad_logits = g.grad_logits + z_grad
    bad_weight = bad_logits.T @ view.hidden.to(bad_logits.dtype)  # [V, H]
    return g, c, view, bad_logits, bad_weight, 2 * lam * lse


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_zero_sum_passes_on_softmax_gradients(dtype: torch.dtype) -> None:
    g, c, view, *_ = z_loss_case(dtype)
    result = zero_sum(g.grad_logits, g.grad_weight, c, view.hidden, view.logits)
    assert result.passed
    assert result.logits_max_rel is not None and result.logits_max_rel <= result.logits_tolerance
    assert result.weight_rel is not None and result.weight_rel <= result.weight_tolerance


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_zero_sum_fails_when_a_z_loss_term_is_added(dtype: torch.dtype) -> None:
    _, c, view, bad_logits, bad_weight, row_sums = z_loss_case(dtype)
    result = zero_sum(bad_logits, bad_weight, c, view.hidden, view.logits)
    assert not result.passed
    assert result.logits_max_rel is not None and result.logits_max_rel > result.logits_tolerance
    assert result.weight_rel is not None and result.weight_rel > result.weight_tolerance
    # The reported |Σ_v G_v| is the z-loss's 2λ·lse (to the dtype's rounding).
    assert result.logits_max_abs == pytest.approx(float(row_sums.abs().max()), rel=1e-4)


def test_zero_sum_fails_when_only_the_lm_head_gradient_is_broken() -> None:
    g, c, view, *_ = z_loss_case(F64)
    broken = g.grad_weight.clone()
    broken[0] += 1e-3 * float(g.grad_weight.norm())  # rows no longer sum to zero
    result = zero_sum(g.grad_logits, broken, c, view.hidden, view.logits)
    assert result.logits_max_rel is not None and result.logits_max_rel <= result.logits_tolerance
    assert not result.passed


# ----------------------------------------------------------------------------- ratio_stats


def test_ratio_stats_by_hand() -> None:
    # Valid tokens: π_θ(y) = 0.5, 0.2, 0.3 and π_old(y) = 0.25, 0.4, 0.3 → r = 2, 0.5, 1;
    # the 4th position is masked and holds NaN, which must be ignored.
    logp = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3), math.nan]], dtype=F64)
    old = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.3), 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    s = ratio_stats(logp, old, mask)
    assert (s.count, s.non_finite) == (3, 0)
    assert s.mean == pytest.approx(3.5 / 3, abs=1e-12)  # (2 + 0.5 + 1)/3
    assert (s.min, s.max) == (pytest.approx(0.5, abs=1e-12), pytest.approx(2.0, abs=1e-12))
    # Linear-interpolated quantiles of sorted [0.5, 1, 2]: p50 at 1.0 → 1;
    # p05 at 0.1 → 0.5 + 0.1·0.5 = 0.55; p95 at 1.9 → 1 + 0.9·1 = 1.9.
    assert s.p50 == pytest.approx(1.0, abs=1e-12)
    assert s.p05 == pytest.approx(0.55, abs=1e-12)
    assert s.p95 == pytest.approx(1.9, abs=1e-12)
    # k1 = mean(−log r) = (−ln2 + ln2 + 0)/3 = 0
    assert s.kl_k1 == pytest.approx(0.0, abs=1e-12)
    # k3 = mean(r − 1 − log r) = [(1 − ln2) + (−0.5 + ln2) + 0]/3 = 0.5/3
    assert s.kl_k3 == pytest.approx(0.5 / 3, abs=1e-12)


def test_ratio_stats_off_policy_k1_k3_values() -> None:
    # One token, r = 2: k1 = −ln2 = −0.693147, k3 = 2 − 1 − ln2 = 0.306853 (k3 ≥ 0 always).
    s = ratio_stats(
        torch.tensor([[math.log(0.5)]], dtype=F64),
        torch.tensor([[math.log(0.25)]], dtype=F64),
        torch.tensor([[True]]),
    )
    assert s.kl_k1 == pytest.approx(-LN2, abs=1e-12)
    assert s.kl_k3 == pytest.approx(1 - LN2, abs=1e-12)


def test_ratio_stats_counts_overflowing_ratios() -> None:
    # log r = 1000 overflows exp in float64: counted, and the finite rest still summarised.
    logp = torch.tensor([[0.0, math.log(0.5)]], dtype=F64)
    old = torch.tensor([[-1000.0, math.log(0.5)]], dtype=F64)
    s = ratio_stats(logp, old, torch.tensor([[True, True]]))
    assert (s.count, s.non_finite) == (2, 1)
    assert s.max == pytest.approx(1.0) and s.mean == pytest.approx(1.0)


# ----------------------------------------------------------------------------- clipping


def test_clipping_shares_by_hand() -> None:
    # 2 sequences × 3 positions; (1, 2) is masked, so 5 valid tokens.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    t, f = True, False
    regions = {
        "clip_upper": torch.tensor([[t, f, f], [f, f, t]]),  # (1, 2) is masked: 1/5
        "clip_lower": torch.tensor([[f, t, f], [f, f, f]]),  # 1/5
        "clip_dual": torch.tensor([[f, f, f], [f, t, f]]),  # 1/5
        "seq_masked": torch.tensor([[f, f, f], [t, t, f]]),  # sequence 1: 1/2, tokens 2/5
    }
    # c = 0 at (0,0) (0,1) (1,0) (1,1); (0,2) is 0.3; (1,2) masked → zero_grad = 4/5
    coefficient = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.0, 0.0]], dtype=F64)
    c = clipping(regions, coefficient, mask)
    assert c.upper == pytest.approx(0.2)
    assert c.lower == pytest.approx(0.2)
    assert c.region == pytest.approx(0.4)  # upper ∪ lower = 2/5 (verl pg_clipfrac)
    assert c.dual == pytest.approx(0.2)
    assert c.seq_masked_sequences == pytest.approx(0.5)
    assert c.seq_masked_tokens == pytest.approx(0.4)
    assert c.zero_grad == pytest.approx(0.8)


def test_clipping_without_rules_reports_none() -> None:
    mask = torch.tensor([[True, False]])
    c = clipping({}, torch.tensor([[0.0, 0.0]], dtype=F64), mask)
    assert (c.upper, c.lower, c.region, c.dual, c.seq_masked_sequences) == (None,) * 5
    assert c.zero_grad == 1.0  # the one valid token has c = 0


# ----------------------------------------------------------------------------- row_norms


def test_row_norms_groups_and_top_k_by_hand() -> None:
    # Rows: ‖[3, 4]‖ = 5, ‖[0, 0]‖ = 0, ‖[1, 0]‖ = 1, ‖[0, 2]‖ = 2; ‖∂L/∂W‖²_F = 25+0+1+4 = 30.
    grad_weight = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    sampled = torch.tensor([0, 3, 3])  # tokens 0 and 3 were sampled (3 twice)
    r = row_norms(grad_weight, sampled, top_k=3)
    assert r.total_norm == pytest.approx(math.sqrt(30.0))
    # sampled rows {0, 3}: norms [5, 2], share (25 + 4)/30; torch's median of an even count
    # is the lower middle value: 2.
    s = r.sampled_rows
    assert (s.count, s.max, s.median) == (2, pytest.approx(5.0), pytest.approx(2.0))
    assert s.sq_share == pytest.approx(29 / 30)
    # other rows {1, 2}: norms [0, 1], share 1/30, median (lower) 0
    o = r.other_rows
    assert (o.count, o.max, o.median) == (2, pytest.approx(1.0), pytest.approx(0.0))
    assert o.sq_share == pytest.approx(1 / 30)
    assert [(x.token, x.sampled) for x in r.top_rows] == [(0, True), (3, True), (2, False)]
    assert [x.norm for x in r.top_rows] == pytest.approx([5.0, 2.0, 1.0])
    # top_k larger than V lists every row once.
    assert len(row_norms(grad_weight, sampled, top_k=10).top_rows) == 4


# ----------------------------------------------------------------------------- agreement


def agreement_case(dtype: torch.dtype):
    batch = random_batch(2, dtype=dtype)
    spec, params, agg = get_loss("ppo_clip"), LossParams(), Aggregation("seq_mean_token_mean")
    closed = gradients(batch, "ppo_clip", params, agg.mode)
    ref = autograd_reference(batch, spec, params, agg)
    return batch, closed, ref


@pytest.mark.parametrize(
    ("dtype", "bump"),
    # A perturbation 1000× the dtype's tolerance (1e-9 and 1e-4, tolerances.py) must fail.
    [(F64, 1e-6), (torch.float32, 1e-1)],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("field", ["coefficient", "grad_logits", "grad_weight"])
def test_agreement_fails_for_a_perturbed_tensor(
    dtype: torch.dtype, bump: float, field: str
) -> None:
    batch, closed, ref = agreement_case(dtype)
    hidden, tokens = batch.hidden[batch.mask], batch.tokens[batch.mask]
    assert agreement(closed, ref, batch.mask, dtype, hidden, tokens).passed
    tensor = getattr(closed, field)
    perturbed = tensor.clone()
    flat = perturbed.view(-1)
    k = int(tensor.abs().view(-1).argmax())
    flat[k] += bump * float(tensor.abs().max())
    if field == "coefficient":  # c_t lives in the loss's objective
        objective = dataclasses.replace(closed.objective, coefficient=perturbed)
        bumped = dataclasses.replace(closed, objective=objective)
    else:
        bumped = dataclasses.replace(closed, **{field: perturbed})
    result = agreement(bumped, ref, batch.mask, dtype, hidden, tokens)
    assert not result.passed
    # c_t normwise; ∂L/∂z and ∂L/∂W against their terms' sizes, computed here by hand:
    # s_t = |c_t| + max_v |∂L/∂z_t,v|, max_t s_t; and S_v = Σ_t (|∂L/∂z_t,v| + |c_t|·[v = y_t])
    # ·max_j |h_t,j|, max_v S_v
    c = [abs(float(x)) for x in closed.coefficient[batch.mask]]
    g = ref.grad_logits.double().abs().tolist()
    h_max = [float(h.abs().max()) for h in hidden]
    y = tokens.tolist()
    rows = [
        sum((g[t][v] + (c[t] if v == y[t] else 0.0)) * h_max[t] for t in range(len(c)))
        for v in range(len(g[0]))
    ]
    scale = {
        "coefficient": float(tensor.abs().max()),
        "grad_logits": max(c[t] + max(g[t]) for t in range(len(c))),
        "grad_weight": max(rows),
    }[field]
    error = getattr(result, field)
    assert error == pytest.approx(bump * float(tensor.abs().max()) / scale, rel=1e-2)


def test_agreement_fails_on_non_finite_values() -> None:
    batch, closed, ref = agreement_case(F64)
    bad = closed.grad_weight.clone()
    bad[0, 0] = math.nan
    hidden, tokens = batch.hidden[batch.mask], batch.tokens[batch.mask]
    replaced = dataclasses.replace(closed, grad_weight=bad)
    result = agreement(replaced, ref, batch.mask, F64, hidden, tokens)
    assert not result.passed and result.grad_weight is None


# ----------------------------------------------------------------------------- non-finite


def test_overflowing_ratio_is_reported_not_raised() -> None:
    # ppo in float32 with log π_old(y) = −200: log r ≈ −0.69 + 200 = 199.3 > log(float32 max)
    # ≈ 88.7, so r = inf and the gradient is inf/NaN. The run must finish and say so.
    config = literal_config(
        [
            [{"probs": PI, "token": 0, "advantage": 1.0, "old_logp": -200.0}],
            [{"probs": PI, "token": 1, "advantage": -1.0}],
        ],
        ["ppo", "reinforce"],
        dtype="float32",
    )
    report = run_compare(config)
    ppo, reinforce = report.losses
    assert ppo.non_finite > 0
    assert any("NaN" in note and "inf" in note for note in ppo.findings)
    finite = {c.loss: c.passed for c in report.checks if c.name == "finite"}
    assert finite == {"ppo": False, "reinforce": True}
    assert not report.passed
    # The other loss is untouched by the overflow.
    assert reinforce.non_finite == 0 and reinforce.zero_sum.passed and reinforce.agreement.passed


@pytest.mark.parametrize("scale", [1e-170, 1.0, 1e160])
def test_row_norms_total_and_shares_hold_at_every_float64_scale(scale):
    # the squares of 1e-170 underflow and those of 1e160 overflow in float64: the total and the
    # shares are formed without them (a plain Σ n_v² read 0 and inf there)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    rows = row_norms(grad * scale, torch.tensor([0, 2]), 3)
    assert rows.total_norm == pytest.approx(float(grad.norm()) * scale, rel=1e-14)
    plain = row_norms(grad, torch.tensor([0, 2]), 3)
    assert rows.sampled_rows.sq_share == pytest.approx(plain.sampled_rows.sq_share, rel=1e-14)
    assert rows.other_rows.sq_share == pytest.approx(plain.other_rows.sq_share, rel=1e-14)
