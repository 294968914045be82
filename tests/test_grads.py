"""The closed form (master identity, losses.md §0) against torch.autograd, for every registered
loss × every aggregation × a few loss settings, plus a reference written here in plain torch.

Parametrized over `loss_names()` and `AGGREGATIONS`, so a newly registered loss or aggregation
is tested without anyone touching this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import F64, gradients, random_batch, rel_err

from gradlens.containers import Batch
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.agreement import agreement
from gradlens.grads import autograd_reference, closed_form, objective, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names

# float64: both paths evaluate the same formula in a different order, so they differ by a few
# ulps times max|r| and log2 of the number of summed terms (~1e-14 here); 1e-12 leaves 100×
# margin while any formula or sign error is O(1). (gradlens's own check allows 1e-9.)
TOL_F64 = 1e-12

SEED = 3  # a batch in which every setting below actually switches some tokens off

SETTINGS = {
    "default": LossParams(),
    "dual_clip": LossParams(dual_clip=3.0),
    # δ = 0.05: sequences with A < 0 whose mean(ℓ_old − ℓ) > 0.05 are masked (asserted below).
    "opsm": LossParams(opsm_delta=0.05),
    "eps_high_small": LossParams(eps_high=0.02),
}
# The ppo_clip region each setting must populate for the case to exercise its rule.
EXERCISED = {
    "default": ("clip_upper", "clip_lower"),
    "dual_clip": ("clip_dual",),
    "opsm": ("seq_masked",),
    "eps_high_small": ("clip_upper",),
}


def batch64() -> Batch:
    return random_batch(SEED, n=8, t=6, v=13, h=7, drift=1.0)


def ppo_clip_regions(batch: Batch, params: LossParams) -> dict[str, torch.Tensor]:
    return gradients(batch, "ppo_clip", params).terms.regions


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_setting_exercises_its_rule(setting: str) -> None:
    # Guard against a vacuous suite: each setting must switch off some, but not all, tokens.
    batch = batch64()
    regions = ppo_clip_regions(batch, SETTINGS[setting])
    for name in EXERCISED[setting]:
        hit = regions[name] & batch.mask
        assert 0 < int(hit.sum()) < batch.num_tokens, (setting, name)
    if setting == "opsm":
        # Whole sequences: some masked, and a masked sequence is masked at every valid token.
        masked_seq = regions["seq_masked"].any(-1)
        assert 0 < int(masked_seq.sum()) < batch.num_sequences
        assert torch.equal(regions["seq_masked"], masked_seq[:, None] & batch.mask)


@pytest.mark.every_loss  # the fast subset's check of every loss (tests/conftest.py)
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("loss", loss_names())
def test_closed_form_matches_autograd_float64(loss: str, mode: str, setting: str) -> None:
    batch = batch64()
    params = SETTINGS[setting]
    spec = get_loss(loss)
    agg = Aggregation(mode, 7.0 if mode.endswith("_norm") else None)
    closed = closed_form(batch, softmax_view(batch), spec, params, agg)
    ref = autograd_reference(batch, spec, params, agg)

    m = batch.mask
    assert float(closed.grad_weight.abs().max()) > 0  # a non-trivial gradient is compared
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)
    # Masked positions carry no coefficient in either path.
    assert torch.all(closed.coefficient[~m] == 0) and torch.all(ref.coefficient[~m] == 0)
    if loss == "ppo_clip":
        # Where ppo_clip switches a token off, its closed-form coefficient is exactly 0.
        off = torch.zeros_like(m)
        for region in closed.terms.regions.values():
            off |= region
        assert torch.all(closed.coefficient[off & m] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("loss", loss_names())
def test_closed_form_matches_autograd_low_precision(loss: str, dtype: torch.dtype) -> None:
    # Tolerances are gradlens's own per-dtype ones (their reasons are in tolerances.py).
    tol = tolerances.agreement(dtype)
    batch = random_batch(SEED, n=8, t=6, v=13, h=7, dtype=dtype, drift=1.0)
    assert batch.weight.dtype == dtype and batch.old_logp.dtype == torch.float32
    spec, params, agg = get_loss(loss), LossParams(dual_clip=3.0), Aggregation("token_mean")
    closed = closed_form(batch, softmax_view(batch), spec, params, agg)
    ref = autograd_reference(batch, spec, params, agg)
    m = batch.mask
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= tol
    assert rel_err(closed.grad_logits, ref.grad_logits) <= tol
    assert rel_err(closed.grad_weight, ref.grad_weight) <= tol
    assert agreement(closed, ref, m, dtype, batch.hidden[m], batch.tokens[m]).passed
    # The low-precision closed form stays close to the float64 truth on the same operands:
    # only the softmax/accumulation rounding differs, bounded by the same tolerance.
    exact = dataclasses.replace(
        batch,
        hidden=batch.hidden.double(),
        weight=batch.weight.double(),
        old_logp=batch.old_logp.double(),
        advantages=batch.advantages.double(),
    )
    truth = closed_form(exact, softmax_view(exact), spec, params, agg)
    assert rel_err(closed.grad_weight, truth.grad_weight) <= tol


# ----------------------------------------------------------------- an independent reference


def own_weights(
    mask: torch.Tensor, mode: str, scale: float | None, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Aggregation weights a_{i,t} written out from losses.md §7.5, not from gradlens."""
    m = mask.double()
    if mode == "prompt_average":  # 1/(G·N_tok,g): a token mean per prompt, then a mean
        assert groups is not None
        tokens = {int(g): float(m[groups == g].sum()) for g in groups.unique()}
        present = sum(1 for n in tokens.values() if n > 0)  # G
        per_row = torch.tensor([max(tokens[int(g)], 1.0) for g in groups], dtype=m.dtype)
        return m / (per_row[:, None] * present)
    lengths = m.sum(-1, keepdim=True)  # [N, 1] |y_i|
    present = float((lengths > 0).sum())  # B'
    if mode == "token_mean":
        return m / m.sum()
    if mode == "seq_mean_token_mean":
        return torch.where(lengths > 0, m / (lengths.clamp(min=1) * present), 0.0)
    if mode == "seq_mean_token_sum":
        return m / present
    if mode == "token_sum":
        return m
    length_scale = scale if scale is not None else mask.shape[-1]  # L_scale
    if mode == "token_sum_norm":
        return m / length_scale
    if mode == "seq_mean_token_sum_norm":
        return m / (present * length_scale)
    raise AssertionError(f"no hand-written weights for aggregation {mode!r}")


def own_loss_grad_weight(batch: Batch, loss: str, params: LossParams, mode: str) -> torch.Tensor:
    """∂L/∂W by autograd through plain torch: logits = h Wᵀ, log_softmax, gather, loss."""
    weight = batch.weight.detach().clone().requires_grad_(True)  # [V, H]
    logits = torch.einsum("nth,vh->ntv", batch.hidden, weight)  # [N, T, V]
    logp = torch.log_softmax(logits, -1).gather(-1, batch.tokens[..., None])[..., 0]  # [N, T]
    mask = batch.mask
    adv = torch.where(mask, batch.advantages, 0.0)
    if loss == "reinforce":
        per_token = -adv * logp
    elif loss == "ppo_clip":
        # verl compute_policy_loss_vanilla, as quoted in losses.md §2.1 (no ±20 clamp).
        old = torch.where(mask, batch.old_logp, 0.0)
        ratio = torch.exp(torch.where(mask, logp, 0.0) - old)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - params.eps_low, 1 + params.eps_high)
        clip1 = torch.maximum(pg1, pg2)
        if params.dual_clip is None:
            per_token = clip1
        else:
            pg3 = -adv * params.dual_clip
            per_token = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    else:
        raise AssertionError(loss)
    a = own_weights(mask, mode, 5.0, batch.groups)
    (a * torch.where(mask, per_token, 0.0)).sum().backward()
    assert weight.grad is not None
    return weight.grad


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize(
    "loss, params",
    [
        ("reinforce", LossParams()),
        ("ppo_clip", LossParams()),
        ("ppo_clip", LossParams(eps_low=0.1, eps_high=0.05, dual_clip=2.0)),
    ],
    ids=["reinforce", "ppo_clip", "ppo_clip_dual"],
)
def test_grad_weight_matches_plain_torch(loss: str, params: LossParams, mode: str) -> None:
    batch = batch64()
    # Sequence 1 has no valid token: B' (sequences with ≥ 1 token) = N − 1 differs from N.
    mask = batch.mask.clone()
    mask[1] = False
    batch = dataclasses.replace(batch, mask=mask)
    assert batch.hidden.dtype == F64
    closed = gradients(batch, loss, params, mode, 5.0)
    expected = own_loss_grad_weight(batch, loss, params, mode)
    # float64, same reason as TOL_F64: only the summation order differs.
    assert float(expected.abs().max()) > 0
    assert rel_err(closed.grad_weight, expected) <= TOL_F64
    if loss == "ppo_clip":
        # The batch must contain tokens the clip switches off, or ppo_clip = ppo here.
        assert bool(closed.terms.regions["clip_upper"].any())
        assert bool(closed.terms.regions["clip_lower"].any())
        if params.dual_clip is not None:
            assert bool(closed.terms.regions["clip_dual"].any())


def test_a_reference_takes_the_closed_forms_top_entropy_selection_as_given() -> None:
    # S_t is a 0/1 step of H_t: two computations of H_t that round differently (the engine's
    # pass and autograd's log_softmax) may put a token on either side of the threshold, and
    # completions of one prompt tie exactly on their first token. The reference differentiates
    # the loss with the closed form's S_t, so the check compares gradients, not two roundings.
    batch = batch64()
    spec, agg = get_loss("ppo_clip"), Aggregation("token_mean")
    params = LossParams(top_entropy_quantile=0.5)
    view = softmax_view(batch)
    m = batch.mask
    own = closed_form(batch, view, spec, params, agg).objective.selection
    assert own is not None and 0 < int(own.sum()) < int(m.sum())
    given = m & ~own  # the other tokens: a selection the entropies do not imply
    obj = objective(batch, view.logp, spec, params, agg, view.entropy_grid(), selection=given)
    assert obj.selection is given
    ref = autograd_reference(batch, spec, params, agg, given)
    assert torch.all(obj.coefficient[m & ~given] == 0) and torch.all(ref.coefficient[~given] == 0)
    assert float(ref.coefficient[given].abs().max()) > 0
    assert rel_err(obj.coefficient[m], ref.coefficient[m]) <= TOL_F64
