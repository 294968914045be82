"""The corrections of docs/losses.md §2.12 taken from verl, AReaL and NeMo RL: verl's rejection
options (chainable), batch-normalised IS weights and bypass mode, AReaL's rejection config and
NeMo's ``seq-mask-tis``.

Each weight is checked against its definition written out here (not from gradlens), against
verl's real rollout-correction functions where verl is installed (skipped otherwise), and the
gradient of every loss that carries it against autograd in float64.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import F64, literal_config, rel_err, three_policy_batch
from torch import Tensor

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.errors import GradlensError
from gradlens.grads import autograd_reference, closed_form, softmax_view, token_inputs
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction
from gradlens.losses.corrections import KINDS, apply_corrections, correction_weight, with_defaults

# Closed form vs autograd, and gradlens vs verl, in float64: the same formulas in other orders,
# a few ulps times the summed terms (ρ ≤ e² here); 1e-12 keeps a wide margin (errors are O(1)).
TOL_F64 = 1e-12
# verl's masked means divide by the count + 1e-8: a relative 1e-8/count, at most 5e-9 with the
# 2-token sequence of `batch()`; a wrong normaliser is off by O(1).
VERL_MEAN = 1e-8

VERL_OPTIONS = [
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
]
# Thresholds that reject some and keep some on `batch()` (asserted in each test): verl's
# threshold strings, "low_high" on the ratio for the k1 options, an upper bound otherwise.
VERL_THRESHOLDS = {
    "token_k1": (0.8, 1.25),
    "token_k2": (None, 0.02),
    "token_k3": (None, 0.02),
    "seq_sum_k1": (0.6, 1.5),
    "seq_sum_k2": (None, 0.08),
    "seq_sum_k3": (None, 0.08),
    "seq_mean_k1": (0.9, 1.1),
    "seq_mean_k2": (None, 0.015),
    "seq_mean_k3": (None, 0.015),
    "seq_max_k2": (None, 0.04),
    "seq_max_k3": (None, 0.04),
}


def batch(seed: int = 7) -> Batch:
    """8 sequences of 6 tokens, log ρ ~ N(0, 0.2²), one sequence shortened to 2 tokens."""
    b = three_policy_batch(seed, drift=0.5, rollout=0.2)
    mask = b.mask.clone()
    mask[2, 2:] = False
    return dataclasses.replace(b, mask=mask)


def log_rho(b: Batch) -> Tensor:
    assert b.rollout_logp is not None
    return torch.where(b.mask, b.old_logp - b.rollout_logp, 0.0)


def per_sequence(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """[N, T] → [N, 1]: a sequence's sum, mean or max over its valid tokens, written out."""
    rows = []
    for v, m in zip(values, mask, strict=True):
        x = v[m]
        if how == "sum":
            rows.append(x.sum())
        elif how == "mean":
            rows.append(x.mean() if len(x) else torch.tensor(0.0, dtype=F64))
        else:
            rows.append(x.max() if len(x) else torch.tensor(0.0, dtype=F64))
    return torch.stack(rows)[:, None]


def verl_keep(b: Batch, option: str, low: float | None, high: float) -> Tensor:
    """verl's rule from its docs (rollout_corr_math.md), written out: [N, T] bool kept."""
    lr = log_rho(b)
    k = {"k1": -lr, "k2": 0.5 * lr**2, "k3": lr.exp() - 1 - lr}[option[-2:]]
    stat = k if option.startswith("token") else per_sequence(k, b.mask, option.split("_")[1])
    if option.endswith("k1"):
        lo = math.log(low if low is not None else 1 / high)
        return (stat >= lo) & (stat <= math.log(high)) & b.mask
    return (stat <= high) & b.mask


def current_logp(b: Batch) -> Tensor:
    """[N, T] ℓ = log π_θ(y_t) of the batch's hidden states and weight (0 at padding)."""
    return torch.where(b.mask, softmax_view(b).logp, 0.0)


def weight(b: Batch, c: Correction, bypass: bool = False, logp: Tensor | None = None) -> Tensor:
    inputs = token_inputs(b, b.old_logp if logp is None else logp)
    w, _ = correction_weight(inputs, c, bypass)
    return w


@pytest.mark.parametrize("option", VERL_OPTIONS)
def test_verl_rejection_options_match_their_definition(option: str) -> None:
    b = batch()
    low, high = VERL_THRESHOLDS[option]
    c = with_defaults(option, low, high)
    w = weight(b, c)
    keep = verl_keep(b, option, low, high)
    assert 0 < int(keep.sum()) < int(b.mask.sum())  # rejects some, keeps some
    assert torch.equal(w, keep.to(F64))


@pytest.fixture(scope="module")
def verl_rc() -> Any:
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


def verl_spec(option: str, low: float | None, high: float) -> str:
    return f"{low!r}_{high!r}" if option.endswith("k1") and low is not None else repr(high)


@pytest.mark.parametrize("option", VERL_OPTIONS)
def test_verl_rejection_options_match_verl(verl_rc: Any, option: str) -> None:
    b = batch()
    low, high = VERL_THRESHOLDS[option]
    kept, _ = verl_rc.compute_rollout_rejection_mask(
        log_ratio=b.old_logp - b.rollout_logp,
        response_mask=b.mask.to(F64),
        rollout_rs=option,
        rollout_rs_threshold=verl_spec(option, low, high),
    )
    assert torch.equal(weight(b, with_defaults(option, low, high)), kept)


def test_a_chain_of_verl_options_is_their_product(verl_rc: Any) -> None:
    # verl's "token_k1,seq_mean_k3" keeps a token only when both options keep it
    b = batch()
    kept, _ = verl_rc.compute_rollout_rejection_mask(
        log_ratio=b.old_logp - b.rollout_logp,
        response_mask=b.mask.to(F64),
        rollout_rs="token_k1,seq_mean_k3",
        rollout_rs_threshold="0.8_1.25,0.015",
    )
    chain = (with_defaults("token_k1", 0.8, 1.25), with_defaults("seq_mean_k3", None, 0.015))
    view = softmax_view(b)
    params = LossParams(corrections=chain)
    plain = closed_form(b, view, get_loss("reinforce"), LossParams(), Aggregation("token_sum"))
    both = closed_form(b, view, get_loss("reinforce"), params, Aggregation("token_sum"))
    one = [weight(b, c) for c in chain]
    assert not torch.equal(one[0], one[1])  # the two options reject different tokens
    assert rel_err(both.coefficient, kept * plain.coefficient) <= TOL_F64


@pytest.mark.parametrize(
    "kind, low, high, level, threshold",
    [
        ("token_tis", None, 1.3, "token", 1.3),
        ("seq_tis", None, 1.3, "sequence", 1.3),
        ("icepop", 0.8, 1.25, "token", "0.8_1.25"),
        ("seq_mis", 0.6, 1.6, "sequence", "0.6_1.6"),
    ],
)
def test_batch_normalised_weights_match_verl(
    verl_rc: Any, kind: str, low: float | None, high: float, level: str, threshold: Any
) -> None:
    b = batch()
    weights, _ = verl_rc.compute_rollout_correction_weights(
        log_ratio=b.old_logp - b.rollout_logp,
        response_mask=b.mask.to(F64),
        rollout_is=level,
        rollout_is_threshold=threshold,
        rollout_is_batch_normalize=True,
    )
    mine = weight(b, Correction(kind, low, high, batch_normalize=True))
    plain = weight(b, Correction(kind, low, high))
    assert abs(float(plain[b.mask].mean()) - 1.0) > 1e-3  # the normalisation does something
    assert rel_err(mine, weights) <= VERL_MEAN


def test_batch_normalised_weights_match_their_definition() -> None:
    b = batch()
    m = b.mask
    w = weight(b, Correction("token_tis", None, 1.3))
    normed = weight(b, Correction("token_tis", None, 1.3, batch_normalize=True))
    assert rel_err(normed, w / w[m].mean()) <= TOL_F64  # mean over the valid tokens
    s = weight(b, Correction("seq_tis", None, 1.3))
    per_seq = torch.stack([row[mm][0] for row, mm in zip(s, m, strict=True) if mm.any()])
    normed = weight(b, Correction("seq_tis", None, 1.3, batch_normalize=True))
    assert rel_err(normed, s / per_seq.mean()) <= TOL_F64  # each sequence counted once


def test_seq_mask_tis_is_the_geometric_filter_times_the_raw_token_ratio() -> None:
    # Two tokens with ρ = 4 and 1/4: exp(mean log ρ) = 1 ∈ [0.999, 1.002], so both are kept
    # with their unclamped ρ; a third sequence with ρ = 2 alone (geo 2) is rejected.
    pos = {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 0, "advantage": 1.0}
    seq = [
        {**pos, "old_prob": 0.4, "rollout_prob": 0.1},
        {**pos, "old_prob": 0.1, "rollout_prob": 0.4},
    ]
    lone = [{**pos, "old_prob": 0.4, "rollout_prob": 0.2}]
    config = literal_config(
        [seq, lone],
        ["reinforce"],
        aggregation="token_sum",
        corrections=[{"kind": "seq_mask_tis"}],
    )
    report = run_compare(config)
    tokens = report.losses[0].tokens
    assert tokens is not None
    # reinforce, A = 1, weight 1: c = −w = −ρ where kept, 0 where rejected
    assert [t.coefficient for t in tokens] == pytest.approx([-4.0, -0.25, 0.0], abs=1e-12)
    assert report.losses[0].clipping.sequence_shares["seq_mask_tis_masked"] == 0.5


# ----------------------------------------------------------------------------- AReaL


AREAL_KINDS = [k for k in KINDS if k.startswith("areal_")]


def areal_reference(b: Batch, kind: str, low: float | None, high: float) -> Tensor:
    """AReaL's ``apply_rejection_sampling`` written out from its code (weight × keep/clamp)."""
    parts = kind.removeprefix("areal_").removesuffix("_clamp").split("_")
    metric, level = parts[-1], "_".join(parts[:-1])
    clamp = kind.endswith("_clamp")
    m, lr = b.mask, log_rho(b)
    rho = lr.exp()
    value = {"ratio": lr, "k1": lr, "k2": lr**2 / 2, "k3": (-lr).exp() - 1 + lr}[metric]
    w = rho
    if level == "token":
        stat = rho if metric == "ratio" else value
    else:
        stat = per_sequence(value, m, level.removeprefix("seq_"))
        if metric == "ratio":
            stat = stat.exp()
            w = per_sequence(lr, m, "mean").exp().expand_as(rho)
    inside = stat <= high
    if low is not None:
        inside = inside & (stat >= low)
    inside = inside.expand_as(rho)
    if clamp:
        out = torch.where(inside, w, w.clamp(min=low or 0.0, max=high))
    else:
        out = torch.where(inside, w, 0.0)
    return torch.where(m, out, 0.0)


AREAL_BOUNDS = {"ratio": (0.8, 1.2), "k1": (-0.1, 0.1), "k2": (None, 0.01), "k3": (None, 0.01)}


@pytest.mark.parametrize("kind", AREAL_KINDS)
def test_areal_kinds_match_areal_code(kind: str) -> None:
    b = batch()
    metric = kind.removesuffix("_clamp").split("_")[-1]
    low, high = AREAL_BOUNDS[metric]
    if "seq_sum" in kind:  # a sum over up to 6 tokens: wider bounds to keep some
        low, high = (0.5, 2.0) if metric == "ratio" else (-0.3 if low else None, 0.05)
    w = weight(b, with_defaults(kind, low, high))
    expected = areal_reference(b, kind, low, high)
    rho = log_rho(b).exp()
    assert int((expected != 0).sum()) > 0  # something kept
    assert bool(((expected != rho) & b.mask).any())  # and something changed
    assert rel_err(w, expected) <= TOL_F64


def test_areal_k3_inverts_the_ratio_and_k1_keeps_its_sign() -> None:
    # ρ = 2 on one token: AReaL's k3 = 1/2 − 1 + ln 2 = 0.1931, verl's = 2 − 1 − ln 2 = 0.3069;
    # a bound of 0.25 keeps it under AReaL and rejects it under verl. AReaL's k1 = +ln 2.
    pos = {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 0, "advantage": 1.0}
    seq = [[{**pos, "old_prob": 0.4, "rollout_prob": 0.2}]]
    cases = {
        ("areal_token_k3", None, 0.25): -2.0,  # kept with w = ρ = 2
        ("token_k3", None, 0.25): 0.0,  # rejected
        ("areal_token_k1", 0.6, 0.7): -2.0,  # ln 2 = 0.693 ∈ [0.6, 0.7]
    }
    for (kind, low, high), c in cases.items():
        config = literal_config(
            seq,
            ["reinforce"],
            aggregation="token_sum",
            corrections=[{"kind": kind, "low": low, "high": high}],
        )
        tokens = run_compare(config).losses[0].tokens
        assert tokens is not None
        assert tokens[0].coefficient == pytest.approx(c, abs=1e-12), kind


# ----------------------------------------------------------------------------- bypass mode


def test_bypass_mode_is_ppo_against_the_rollout_with_corrections_on_pi_theta() -> None:
    b = batch()
    view = softmax_view(b)
    c = with_defaults("token_k1", 0.8, 1.25, renormalize=True)
    agg = Aggregation("token_mean")
    on = closed_form(b, view, get_loss("ppo_clip"), LossParams(bypass_mode=True), agg)
    against = dataclasses.replace(b, old_logp=b.rollout_logp)
    assert (
        rel_err(
            on.coefficient,
            closed_form(against, view, get_loss("ppo_clip"), LossParams(), agg).coefficient,
        )
        <= TOL_F64
    )
    # the rejection reads sg[ℓ] − ℓ_μ (ℓ: the current policy), not ℓ_old − ℓ_μ
    now = dataclasses.replace(b, old_logp=current_logp(b))
    keep = verl_keep(now, "token_k1", 0.8, 1.25)
    assert not torch.equal(keep, verl_keep(b, "token_k1", 0.8, 1.25))  # the anchors differ
    params = LossParams(corrections=(c,), bypass_mode=True)
    got = closed_form(b, view, get_loss("reinforce"), params, agg)
    a_t = keep.to(F64) / keep.sum()  # renormalised: 1/N_kept on the kept tokens
    assert rel_err(got.coefficient, -a_t * b.advantages) <= TOL_F64


def test_bypass_reinforce_matches_verl(verl_rc: Any) -> None:
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    b = batch()
    view = softmax_view(b)
    logp = current_logp(b).requires_grad_(True)
    mask = b.mask.to(F64)
    # verl's bypass mode with loss_type reinforce: IS weights and rejection on π_θ/μ
    proto, kept, _ = verl_rc.compute_rollout_correction_and_rejection_mask(
        old_log_prob=logp.detach(),
        rollout_log_prob=b.rollout_logp,
        response_mask=mask,
        rollout_is="token",
        rollout_is_threshold=1.3,
        rollout_rs="seq_mean_k2",
        rollout_rs_threshold=0.13,
    )
    loss, _ = core.compute_policy_loss_reinforce(
        rollout_log_prob=b.rollout_logp,
        log_prob=logp,
        advantages=b.advantages,
        response_mask=kept,
        loss_agg_mode="token-mean",
        config=SimpleNamespace(global_batch_info={}),
        rollout_is_weights=proto.batch["rollout_is_weights"],
    )
    (grad,) = torch.autograd.grad(loss, logp)
    corrections = (
        with_defaults("token_tis", None, 1.3),
        with_defaults("seq_mean_k2", None, 0.13, renormalize=True),
    )
    params = LossParams(corrections=corrections, bypass_mode=True)
    got = closed_form(b, view, get_loss("reinforce"), params, Aggregation("token_mean"))
    assert 0 < int(kept.sum()) < int(b.mask.sum())
    assert rel_err(got.coefficient, torch.where(b.mask, grad, 0.0)) <= TOL_F64


def test_bypass_mode_needs_rollout_log_probs() -> None:
    b = dataclasses.replace(batch(), rollout_logp=None)
    with pytest.raises(GradlensError, match=r"loss\.bypass_mode"):
        closed_form(
            b, softmax_view(b), get_loss("ppo_clip"), LossParams(bypass_mode=True), Aggregation()
        )


# ----------------------------------------------------------------------------- autograd twins


NEW_CORRECTIONS = {
    "token_k1": with_defaults("token_k1", 0.8, 1.25),
    "seq_sum_k3_renorm": with_defaults("seq_sum_k3", None, 0.08, renormalize=True),
    "seq_max_k2": with_defaults("seq_max_k2", None, 0.04),
    "seq_mask_tis": with_defaults("seq_mask_tis", 0.9, 1.1),
    "areal_seq_mean_ratio_clamp": with_defaults("areal_seq_mean_ratio_clamp", 0.95, 1.05),
    "areal_seq_max_k3": with_defaults("areal_seq_max_k3", None, 0.04),
    "tis_normalised": with_defaults("token_tis", None, 1.3, batch_normalize=True),
    "seq_tis_normalised": with_defaults("seq_tis", None, 1.3, batch_normalize=True),
}


def cycled(names: list[str], others: list[str]) -> list[tuple[str, str, str, bool]]:
    """(loss, correction, aggregation, bypass) for every pair; the aggregation and the bypass
    cycle so that each loss and each correction meets each of them."""
    modes = list(AGGREGATIONS)
    return [
        (a, b, modes[(i + j) % len(modes)], (i + j) % 2 == 1)
        for i, a in enumerate(names)
        for j, b in enumerate(others)
    ]


@pytest.mark.parametrize(
    "loss_name, name, mode, bypass", cycled(loss_names(), list(NEW_CORRECTIONS))
)
def test_new_corrections_agree_with_autograd_for_every_loss(
    loss_name: str, name: str, mode: str, bypass: bool
) -> None:
    b = batch(3)
    params = LossParams(corrections=(NEW_CORRECTIONS[name],), bypass_mode=bypass)
    spec = get_loss(loss_name)
    agg = Aggregation(mode, 5.0)
    closed = closed_form(b, softmax_view(b), spec, params, agg)
    ref = autograd_reference(b, spec, params, agg)
    m = b.mask
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)


def test_corrections_weigh_the_policy_term_through_apply_corrections() -> None:
    # apply_corrections multiplies g_t by w_t (the penalty aside): checked on reinforce, g = −A
    b = batch()
    inputs = token_inputs(b, b.old_logp)
    c = with_defaults("seq_mask_tis", 0.9, 1.1)
    terms = get_loss("reinforce").terms(inputs, LossParams(), Aggregation())
    out = apply_corrections(terms, inputs, (c,))
    assert rel_err(out.per_token_grad, weight(b, c) * terms.per_token_grad) <= TOL_F64


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "correction, message",
    [
        ({"kind": "seq_mean_k3"}, "needs a threshold high"),
        ({"kind": "token_k2", "low": 0.1, "high": 1.0}, "takes an upper threshold only"),
        ({"kind": "geo_mask", "batch_normalize": True}, "batch_normalize applies to importance"),
        ({"kind": "token_tis", "renormalize": True}, "renormalize applies to the kinds"),
        ({"kind": "token_k9", "high": 1.0}, "token_k1"),  # unknown kind: the closest names
    ],
)
def test_correction_config_errors(correction: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=message):
        validate({"loss": {"corrections": [correction]}})


def test_new_settings_in_config_and_report() -> None:
    config = validate(
        {
            "losses": ["ppo_clip", "reinforce"],
            "source": {"vocab_size": 64, "num_sequences": 8, "rollout_drift": 0.3},
            "loss": {
                "bypass_mode": True,
                "corrections": [
                    {"kind": "seq_mean_k1", "high": 1.05, "renormalize": True},
                    {"kind": "token_tis", "high": 1.5, "batch_normalize": True},
                ],
            },
        }
    )
    params = config.loss.params()
    assert params.bypass_mode
    assert params.corrections[1] == Correction("token_tis", None, 1.5, False, True)
    report = run_compare(config)
    assert report.passed, [c for c in report.checks if not c.passed]
    for r in report.losses:
        assert "seq_rs_mean_k1_masked" in r.clipping.sequence_shares
