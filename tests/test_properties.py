"""Invariants of the maths, on small random float64 batches drawn by hypothesis.

(1) zero-sum, (2) on-policy ppo_clip = ppo = reinforce, (3) sft = reinforce with A ≡ 1,
(4) shift invariance, (5) masked positions don't matter, (6) micro-batch split = full batch,
(7) ppo_clip's coefficient vanishes exactly on its regions, (8) strict clip boundaries.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import F64, gradients, make_batch, on_policy, random_batch, rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradlens.containers import Batch
from gradlens.diagnostics import tolerances
from gradlens.grads import LossGradients, autograd_reference, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# float64 comparisons of two evaluations of one formula in different orders: a few ulps times
# log2 of the summed terms and max r ≤ e² (≤ 1e-14); 1e-12 keeps margin, errors are O(1).
TOL = 1e-12


# ----------------------------------------------------------------------------- strategies


def _floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    # No subnormals: their absolute (not relative) rounding would break the relative bounds
    # below for a reason that has nothing to do with the maths under test.
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def batches(draw: st.DrawFn, min_n: int = 1) -> Batch:
    """N in 1..4, T in 1..6, V in 2..12, H in 1..6; random logit scale; advantages with exact
    zeros; random masks with ≥ 1 valid token; log r = ℓ − ℓ_old in [−2, 2] or exactly 0."""
    n, t = draw(st.integers(min_n, 4)), draw(st.integers(1, 6))
    v, h = draw(st.integers(2, 12)), draw(st.integers(1, 6))
    scale = draw(_floats(0.05, 8.0))

    def values(k: int, elements: st.SearchStrategy) -> list:
        return draw(st.lists(elements, min_size=k, max_size=k))

    hidden = torch.tensor(values(n * t * h, _floats(-2, 2)), dtype=F64).view(n, t, h)
    weight = scale * torch.tensor(values(v * h, _floats(-1, 1)), dtype=F64).view(v, h)
    tokens = torch.tensor(values(n * t, st.integers(0, v - 1))).view(n, t)
    mask = torch.tensor(values(n * t, st.booleans())).view(n, t)
    if not mask.any():
        mask.view(-1)[draw(st.integers(0, n * t - 1))] = True
    adv = values(n * t, st.one_of(st.just(0.0), _floats(-3, 3)))
    log_r = values(n * t, st.one_of(st.just(0.0), _floats(-2, 2)))
    batch = make_batch(
        hidden, weight, tokens, mask, advantages=torch.tensor(adv, dtype=F64).view(n, t)
    )
    groups = torch.tensor(values(n, st.integers(0, 1)))  # prompt groups, for real
    return dataclasses.replace(
        batch, old_logp=batch.old_logp - torch.tensor(log_r, dtype=F64).view(n, t), groups=groups
    )


params_st = st.builds(
    LossParams,
    eps_low=_floats(0.0, 0.95),
    eps_high=_floats(0.0, 2.0),
    dual_clip=st.one_of(st.none(), _floats(1.01, 10.0)),
    opsm_delta=st.one_of(st.none(), _floats(0.0, 1.0)),
)
losses_st = st.sampled_from(loss_names())
modes_st = st.sampled_from(list(AGGREGATIONS))
# prompt_average couples the tokens of a prompt group, which a micro-batch may split across its
# parts: no single factor makes a part's loss a term of the full-batch loss (the group-coupled
# losses are left out of that property for the same reason).
micro_modes_st = st.sampled_from([m for m in AGGREGATIONS if m != "prompt_average"])
# The shift (4) and micro-batch (6) properties compare two evaluations of ℓ a few ulps apart:
# they hold where boundary_margin knows every discontinuity of the loss's coefficient and
# ell_noise bounds its sensitivity to ℓ. That is true of these losses. The others' edges —
# DPPO's probability and binary-KL masks, ASPO's entropy widths and 1/r, M2PO's, Clip-Cov's and
# KL-Cov's batch-level selections and KL-Cov's sign(ℓ − ℓ_old) at r = 1, FIPO's safety threshold
# and future sum, GMPO's log-space bounds, LUSPO's |y_i| and VESPO's sequence product, REAL's
# groups, DFT's and CHORD's π_y — are tested against autograd and by hand in tests/losses/
# (test_loss_settings.py and the family files); the batch- and group-coupled ones are not
# micro-batch invariant at all (their selection or normaliser depends on what else is in the
# batch).
SMOOTH = [
    "reinforce",
    "ppo",
    "ppo_clip",
    "sft",
    "grpo",
    "gspo",
    "gspo_token",
    "cispo",
    "cispo_cap",
    "sapo",
    "minirl",
    "ce_gppo",
    "gppo",
    "topr",
    "dro",
    "rollout_is",
    "cispo_rollout",
]
smooth_losses_st = st.sampled_from(SMOOTH)


def all_gradients(batch: Batch, loss: str, params: LossParams, mode: str) -> list[torch.Tensor]:
    """Closed-form (c, ∂L/∂z, ∂L/∂W) and autograd's (c, ∂L/∂z, ∂L/∂W)."""
    scale = 4.0 if mode.endswith("_norm") else None
    closed = gradients(batch, loss, params, mode, scale)
    ref = autograd_reference(batch, get_loss(loss), params, Aggregation(mode, scale))
    return [
        closed.coefficient,
        closed.grad_logits,
        closed.grad_weight,
        ref.coefficient,
        ref.grad_logits,
        ref.grad_weight,
    ]


# ----------------------------------------------------------------------------- (1) zero-sum


@SETTINGS
@given(batch=batches(), loss=losses_st, params=params_st, mode=modes_st)
def test_logit_and_lm_head_gradients_are_zero_sum(
    batch: Batch, loss: str, params: LossParams, mode: str
) -> None:
    view = softmax_view(batch)
    closed = gradients(batch, loss, params, mode, 3.0)
    ref = autograd_reference(batch, get_loss(loss), params, Aggregation(mode, 3.0))
    m, v = closed.grad_logits.shape
    c = closed.coefficient[batch.mask]  # [M]
    norms_h = view.hidden.norm(dim=-1)  # [M]
    # Tolerances are gradlens's rounding bounds (reasons in tolerances.py), applied here to
    # s_t = |c_t| + max_v |G_{t,v}|, the size of the terms before they cancel. They describe
    # gradlens's own normalisation of π; autograd's G comes from torch's log_softmax, whose sum
    # is another computation, but at V ≤ 12 a term goes through at most 11 additions (11·u),
    # far inside the bound (≥ 90·u at V = 2).
    tol_rel = tolerances.zero_sum_logits(F64, v)
    factor = tolerances.zero_sum_weight_factor(F64, v, m)
    for g_logits, g_weight in (
        (closed.grad_logits, closed.grad_weight),
        (ref.grad_logits, ref.grad_weight),
    ):
        s = c.abs() + g_logits.abs().amax(-1)  # [M]
        assert torch.all(g_logits.sum(-1).abs() <= tol_rel * s)
        # Σ_v ∂L/∂W_v = Σ_t (Σ_v G_{t,v}) h_t = 0: the columns of ∂L/∂W sum to zero.
        assert float(g_weight.sum(0).norm()) <= factor * float((s * norms_h).sum())


# ----------------------------------------------------------------------------- (2), (3)


@pytest.mark.slow
@SETTINGS
@given(batch=batches(), params=params_st, mode=modes_st)
def test_on_policy_ppo_clip_equals_ppo_equals_reinforce(
    batch: Batch, params: LossParams, mode: str
) -> None:
    # ℓ_old = ℓ bit for bit, so r = exp(0) = 1 exactly: no clip rule can fire (eps ≥ 0, c > 1,
    # OPSM statistic 0 ≤ δ), and −A·r·M = −A. The equality is exact, not approximate.
    batch = on_policy(batch)
    results = {
        name: gradients(batch, name, params, mode, 2.0) for name in ("reinforce", "ppo", "ppo_clip")
    }
    base = results["reinforce"]
    for name in ("ppo", "ppo_clip"):
        assert torch.equal(results[name].coefficient, base.coefficient), name
        assert torch.equal(results[name].grad_weight, base.grad_weight), name
    for region in results["ppo_clip"].terms.regions.values():
        assert not region.any()


@pytest.mark.slow
@SETTINGS
@given(batch=batches(), mode=modes_st)
def test_sft_equals_reinforce_with_unit_advantage(batch: Batch, mode: str) -> None:
    ones = dataclasses.replace(batch, advantages=torch.ones_like(batch.advantages))
    sft = gradients(batch, "sft", mode=mode, loss_scale_factor=2.0)  # A is ignored by sft
    reinforce = gradients(ones, "reinforce", mode=mode, loss_scale_factor=2.0)
    assert torch.equal(sft.coefficient, reinforce.coefficient)
    assert torch.equal(sft.grad_logits, reinforce.grad_logits)
    assert torch.equal(sft.grad_weight, reinforce.grad_weight)


# ----------------------------------------------------------------------------- (4) shift


def boundary_margin(batch: Batch, params: LossParams) -> float:
    """Distance of every r from every clip bound and of the OPSM statistic from δ."""
    view = softmax_view(batch)
    m = batch.mask
    r = torch.exp(view.logp - batch.old_logp)[m]
    bounds = [1 + params.eps_high, 1 - params.eps_low]
    if params.dual_clip is not None:
        bounds.append(params.dual_clip)
    gaps = [float((r - b).abs().min()) for b in bounds]
    # GSPO clips on the sequence ratio s_i = exp(mean_t log r): its gaps to the bounds count too
    s = torch.exp(((view.logp - batch.old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1))
    gaps += [float((s[m.any(-1)] - b).abs().min()) for b in bounds]
    if params.opsm_delta is not None:
        stat = ((batch.old_logp - view.logp) * m).sum(-1) / m.sum(-1).clamp(min=1)
        gaps.append(float((stat - params.opsm_delta).abs().min()))
    return min(gaps)


@pytest.mark.slow
@SETTINGS
@given(
    batch=batches(),
    loss=smooth_losses_st,
    params=params_st,
    mode=modes_st,
    shift=st.lists(_floats(-20, 20), min_size=24, max_size=24),
)
def test_adding_a_constant_per_token_to_the_logits_changes_nothing(
    batch: Batch, loss: str, params: LossParams, mode: str, shift: list[float]
) -> None:
    # Bias trick: h' = [h, k_t], W' = [W, 1], so z'_t = W h_t + k_t·1 (a per-token shift).
    # A shift moves ℓ by a few ulps; a token within 1e-9 of a clip bound could flip its
    # (discontinuous) mask, which is not what this property is about, so those are skipped.
    assume(boundary_margin(batch, params) > 1e-9)
    n, t, _ = batch.hidden.shape
    k = torch.tensor(shift[: n * t], dtype=F64).view(n, t, 1)
    shifted = dataclasses.replace(
        batch,
        hidden=torch.cat([batch.hidden, k], -1),
        weight=torch.cat([batch.weight, torch.ones(batch.vocab_size, 1, dtype=F64)], -1),
    )
    view, view_s = softmax_view(batch), softmax_view(shifted)
    # The trick did shift each valid token's logits by its k_t (to rounding).
    expected = view.logits + k[batch.mask]
    assert float((view_s.logits - expected).abs().max()) <= 1e-12 * (
        1 + float(expected.abs().max())
    )
    a = gradients(batch, loss, params, mode, 3.0)
    b = gradients(shifted, loss, params, mode, 3.0)
    # Shifting by |k| ≤ 20 changes z's rounding by ≤ u·(|z| + 20) ≈ 1e-14 relative; 1e-10
    # covers that times the ratio factor e². Where c ≈ 0 (A ≈ 0) only the absolute rounding
    # of ℓ remains, so it is the floor (see ell_noise).
    noise = ell_noise(batch, params, a, extra_logit=20.0)  # [M]
    floor = float(noise.max()) if noise.numel() else 0.0
    h_norms = batch.hidden[batch.mask].norm(dim=-1)
    pairs = (
        (b.coefficient, a.coefficient, floor),
        (b.grad_logits, a.grad_logits, floor),  # |e_y − π| ≤ 1 entrywise
        (b.grad_weight[:, :-1], a.grad_weight, 2 * float((noise * h_norms).sum())),
    )
    for new, old, atol in pairs:
        diff = float((new - old).abs().max()) if old.numel() else 0.0
        assert diff <= 1e-10 * float(old.abs().max()) + atol


# ----------------------------------------------------------------------------- (5) masked


@pytest.mark.slow
@SETTINGS
@given(batch=batches(), loss=losses_st, params=params_st, mode=modes_st, seed=st.integers(0, 2**31))
def test_masked_positions_do_not_matter(
    batch: Batch, loss: str, params: LossParams, mode: str, seed: int
) -> None:
    unmasked = ~batch.mask
    assume(bool(unmasked.any()))
    gen = torch.Generator().manual_seed(seed)
    n, t, h = batch.hidden.shape
    noise = torch.randn(n, t, h, generator=gen, dtype=F64) * 100
    other = dataclasses.replace(
        batch,
        hidden=torch.where(unmasked[..., None], noise, batch.hidden),
        tokens=torch.where(
            unmasked, torch.randint(0, batch.vocab_size, (n, t), generator=gen), batch.tokens
        ),
        # Anything at all may sit there, NaN and inf included.
        old_logp=torch.where(unmasked, torch.nan, batch.old_logp),
        advantages=torch.where(unmasked, torch.inf, batch.advantages),
    )
    before, after = (
        all_gradients(batch, loss, params, mode),
        all_gradients(other, loss, params, mode),
    )
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- (6) micro-batches


def ell_noise(batch: Batch, params: LossParams, g: LossGradients, extra_logit: float = 0.0):
    """Absolute size of the coefficient change that rounding ℓ alone can cause, per token [M].

    Evaluating ℓ = z_y − lse with another GEMM shape or a shifted z moves it by up to about
    4u·(max|z| + extra) even where ℓ_old = ℓ; a coefficient moves by at most its sensitivity
    times that: a_t·(|A_t|·max(r_t, 1) + β) covers every loss in SMOOTH (the KL terms and
    dro's penalty add β·O(1)).
    Near A = 0 this absolute part is all that is left, so relative bounds need it as a floor.
    """
    view = softmax_view(batch)
    u = torch.finfo(F64).eps / 2
    dz = 4 * u * (float(view.logits.abs().max()) + extra_logit + 1)
    m = batch.mask
    r = torch.exp(view.logp - batch.old_logp)[m].clamp(min=1)
    weights = g.agg_weights if g.agg_weights is not None else g.weights
    sens = weights[m] * (batch.advantages[m].abs() * r + params.kl_coef + params.dro_beta)
    return 4 * dz * sens  # [M], a factor 4 of margin


def micro_scale(mode: str, micro: Batch, full: Batch) -> float:
    """The factor that makes a micro-batch's loss a term of the full-batch loss."""
    if mode == "token_mean":
        return micro.num_tokens / full.num_tokens  # a = 1/N_tok, rescaled by the token share
    if mode.startswith("seq_mean"):
        present = lambda b: int(b.mask.any(-1).sum())  # noqa: E731  B'
        return present(micro) / present(full)
    return 1.0  # token_sum, token_sum_norm with a fixed L_scale: a does not depend on the batch


def rows(batch: Batch, lo: int, hi: int) -> Batch:
    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[lo:hi]

    return dataclasses.replace(
        batch,
        hidden=batch.hidden[lo:hi],
        tokens=batch.tokens[lo:hi],
        mask=batch.mask[lo:hi],
        old_logp=batch.old_logp[lo:hi],
        advantages=batch.advantages[lo:hi],
        rollout_logp=cut(batch.rollout_logp),
        groups=cut(batch.groups),
    )


@pytest.mark.slow
@SETTINGS
@given(
    batch=batches(min_n=2),
    loss=smooth_losses_st,
    params=params_st,
    mode=micro_modes_st,
    cut=st.integers(1, 3),
    scale=_floats(0.5, 10.0),
)
def test_micro_batches_sum_to_the_full_batch(
    batch: Batch, loss: str, params: LossParams, mode: str, cut: int, scale: float
) -> None:
    # A micro-batch evaluates ℓ in another GEMM shape, a few ulps apart; a token within 1e-9
    # of a clip bound (e.g. r = 1 with ε = 0) could flip its discontinuous mask, which is not
    # what this property is about, so those are skipped (as for the logit shift above).
    assume(boundary_margin(batch, params) > 1e-9)
    cut = min(cut, batch.num_sequences - 1)
    full = gradients(batch, loss, params, mode, scale)
    parts = [rows(batch, 0, cut), rows(batch, cut, batch.num_sequences)]
    terms: list[LossGradients] = [gradients(p, loss, params, mode, scale) for p in parts]
    total = sum(
        micro_scale(mode, p, batch) * g.grad_weight for p, g in zip(parts, terms, strict=True)
    )
    assert isinstance(total, torch.Tensor)
    gross = sum(
        micro_scale(mode, p, batch) * g.grad_weight.abs() for p, g in zip(parts, terms, strict=True)
    )
    assert isinstance(gross, torch.Tensor)
    # Relative to the size of the summed terms (their sum can cancel to ~0), plus what rounding
    # ℓ in another GEMM shape alone can do (see ell_noise), carried through ‖h_t‖.
    m = batch.mask
    floor = float((ell_noise(batch, params, full) * 2 * batch.hidden[m].norm(dim=-1)).sum())
    diff = float((total - full.grad_weight).abs().max())
    assert diff <= TOL * float(gross.max()) + floor


# ----------------------------------------------------------------------------- (7) regions


@pytest.mark.slow
@SETTINGS
@given(batch=batches(), params=params_st, mode=modes_st)
def test_ppo_clip_coefficient_vanishes_exactly_on_its_regions(
    batch: Batch, params: LossParams, mode: str
) -> None:
    g = gradients(batch, "ppo_clip", params, mode, 3.0)
    view = softmax_view(batch)
    m = batch.mask
    adv = torch.where(m, batch.advantages, 0.0)
    r = torch.exp(view.logp - torch.where(m, batch.old_logp, 0.0))
    # Each region is exactly its definition (losses.md §2.2, §3.2), written out independently.
    expected = {
        "clip_upper": (adv > 0) & (r > 1 + params.eps_high),
        "clip_lower": (adv < 0) & (r < 1 - params.eps_low),
    }
    if params.dual_clip is not None:
        expected["clip_dual"] = (adv < 0) & (r > params.dual_clip)
    if params.opsm_delta is not None:
        mf = m.double()
        stat = ((batch.old_logp - view.logp) * mf).sum(-1) / mf.sum(-1).clamp(min=1)
        seq_adv = (adv * mf).sum(-1) / mf.sum(-1).clamp(min=1)
        expected["seq_masked"] = ((seq_adv < 0) & (stat > params.opsm_delta))[:, None] & m
    regions = g.terms.regions
    assert set(regions) == set(expected)
    for name, region in expected.items():
        assert torch.equal(regions[name] & m, region & m), name
    union = torch.zeros_like(m)
    for region in regions.values():
        union |= region
    c = g.coefficient
    assert torch.all(c[union & m] == 0)
    off = ~union & m
    assert torch.equal(c[off], (g.weights * (-adv * r))[off])
    assert torch.all(c[off & (adv != 0)] != 0)  # off the regions, only A = 0 gives zero


# ----------------------------------------------------------------------------- (8) boundaries


def one_token(advantage: float, log_ratio: float) -> Batch:
    """V = 5, π = [0.5, 0.2, 0.15, 0.1, 0.05] via h = e_0, W[:, 0] = log π; y = 0."""
    weight = torch.tensor([[math.log(p)] for p in (0.5, 0.2, 0.15, 0.1, 0.05)], dtype=F64)
    b = make_batch(
        torch.ones(1, 1, 1, dtype=F64),
        weight,
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, 1, dtype=torch.bool),
        advantages=torch.full((1, 1), advantage, dtype=F64),
    )
    return dataclasses.replace(b, old_logp=b.old_logp - log_ratio)


def ratio_of(batch: Batch) -> float:
    return float(torch.exp(softmax_view(batch).logp - batch.old_logp)[0, 0])


def check_agrees_with_autograd(batch: Batch, params: LossParams) -> LossGradients:
    g = gradients(batch, "ppo_clip", params)
    ref = autograd_reference(batch, get_loss("ppo_clip"), params, Aggregation())
    assert rel_err(g.coefficient, ref.coefficient) <= TOL
    return g


def test_r_exactly_one_plus_eps_high_is_not_clipped() -> None:
    # old_logp = logp − log 1.25 and eps_high = 0.25: in float64, exp(ℓ − ℓ_old) rounds to
    # exactly 1.25 (asserted, so the test cannot silently probe a different point).
    batch = one_token(1.0, math.log(1.25))
    assert ratio_of(batch) == 1.25 == 1.0 + 0.25
    g = check_agrees_with_autograd(batch, LossParams(eps_high=0.25))
    assert not bool(g.terms.regions["clip_upper"].any())
    assert float(g.coefficient[0, 0]) == -1.25  # −A·r, unclipped
    # With the bound one ulp below r (1 + eps_high = nextafter(1.25, 0)), r is above it: clipped.
    below = math.nextafter(1.25, 0.0) - 1.0  # exact: Sterbenz
    assert 1.0 + below < 1.25
    g = check_agrees_with_autograd(batch, LossParams(eps_high=below))
    assert bool(g.terms.regions["clip_upper"].all()) and float(g.coefficient[0, 0]) == 0.0


def test_r_exactly_one_minus_eps_low_is_not_clipped() -> None:
    # A < 0; whatever r ≈ 0.8 the float64 path produces, eps_low = 1 − r puts the bound exactly
    # on it (1 − r is exact by Sterbenz for r ∈ [1/2, 1], and so is 1 − (1 − r) = r).
    batch = one_token(-1.0, math.log(0.8))
    r = ratio_of(batch)
    eps_low = 1.0 - r
    assert 1.0 - eps_low == r
    g = check_agrees_with_autograd(batch, LossParams(eps_low=eps_low))
    assert not bool(g.terms.regions["clip_lower"].any())
    assert float(g.coefficient[0, 0]) == r  # −A·r with A = −1
    # With the bound one ulp above r, r is below it: clipped.
    above = 1.0 - math.nextafter(r, 1.0)
    assert 1.0 - above > r
    g = check_agrees_with_autograd(batch, LossParams(eps_low=above))
    assert bool(g.terms.regions["clip_lower"].all()) and float(g.coefficient[0, 0]) == 0.0


def test_clip_bounds_are_strict_on_random_tokens() -> None:
    # For each valid token with A > 0 and r ∈ (1, 2), put 1 + eps_high exactly on r (eps_high =
    # r − 1 is exact there): never clipped, and the coefficient stays −a·A·r ≠ 0.
    checked = 0
    for seed in range(5):
        batch = random_batch(seed, n=3, t=4, drift=0.3)
        r = torch.exp(softmax_view(batch).logp - batch.old_logp)
        picks = (batch.mask & (batch.advantages > 0) & (r > 1) & (r < 2)).nonzero().tolist()
        for i, j in picks:
            eps_high = float(r[i, j]) - 1.0
            assert 1.0 + eps_high == float(r[i, j])
            g = gradients(batch, "ppo_clip", LossParams(eps_high=eps_high))
            assert not bool(g.terms.regions["clip_upper"][i, j])
            assert float(g.coefficient[i, j]) != 0.0
            checked += 1
    assert checked >= 3


def dual_tie() -> tuple[Batch, float]:
    """A = −1 and r ≈ 4 (π = 0.5, π_old = 0.125), with c set to the computed r exactly."""
    batch = one_token(-1.0, math.log(4.0))
    return batch, ratio_of(batch)


def test_r_exactly_dual_clip_is_not_clipped() -> None:
    # Dual clip c = r does not fire (strict r > c): the closed form keeps g = −A·r = r.
    batch, r = dual_tie()
    g = gradients(batch, "ppo_clip", LossParams(dual_clip=r))
    assert not bool(g.terms.regions["clip_dual"].any())
    assert float(g.coefficient[0, 0]) == r
    g = gradients(batch, "ppo_clip", LossParams(dual_clip=math.nextafter(r, 0.0)))
    assert bool(g.terms.regions["clip_dual"].all()) and float(g.coefficient[0, 0]) == 0.0


def test_dual_clip_tie_autograd_matches_closed_form() -> None:
    batch, r = dual_tie()
    g = gradients(batch, "ppo_clip", LossParams(dual_clip=r))
    assert float(g.coefficient[0, 0]) == r  # the closed form is the unclipped one (above)
    check_agrees_with_autograd(batch, LossParams(dual_clip=r))
