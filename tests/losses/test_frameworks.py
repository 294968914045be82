"""Parity against the frameworks' real loss code: verl, TRL and OpenRLHF, in float64.

Every framework loss name (``verl:vanilla``, ``trl:grpo``, ``openrlhf:ppo``, ...) runs the
installed framework's own function on one batch, and its c_t = ∂L/∂ℓ_t (autograd through the
framework's code) is compared with its gradlens twin's closed form: equal where the definitions
agree, equal to the documented factor times the twin where they do not (docs/losses.md §9).
This module installs nothing: each framework's tests skip when it is not importable, and CI
installs the pinned versions (``pip install -e ".[frameworks]"`` and a --no-deps line, .ci/run).

The batch has 8 rows, the last one empty (B = 8, B' = 7), per-sequence advantages (one of them
0), π_old drifted from π_θ, and rollout and reference log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import three_policy_batch
from torch import Tensor
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare.parity import build_parity, materialized_inputs
from gradlens.containers import Batch
from gradlens.grads import autograd_reference, closed_form, softmax_view
from gradlens.losses import Aggregation, LossParams, aggregation_weights, get_loss
from gradlens.losses.base import Correction

F64 = torch.float64
# Both sides evaluate the same float64 formula in different orders: a few ulps (1e-16) per
# operation; 1e-12 leaves a wide margin, while a wrong normaliser or clip moves O(1).
EXACT = 1e-12
# OpenRLHF computes its KL in float32 (log_probs.float()): log-probs of size ≤ 10 carry an
# absolute error ≤ 10·2⁻²⁴ ≈ 6e-7 into u = ℓ_ref − ℓ, so the KL gradient is off by ~1e-6
# relative at most; 1e-5 keeps a margin and is still far below any definition difference.
FLOAT32_KL = 1e-5
VERL_EPS = 1e-8  # verl and OpenRLHF divide a sequence's token sum by |y_i| + 1e-8


def frameworks_batch(drift: float = 0.3) -> Batch:
    b = three_policy_batch(11, drift=drift, rollout=0.1)
    mask = b.mask.clone()
    mask[-1] = False  # an empty row: B = 8 rows, B' = 7 with a token
    return dataclasses.replace(b, mask=mask)


def coefficient(b: Batch, name: str, agg: Aggregation | None = None, **params: Any) -> Tensor:
    """c_t [N, T] of a loss on ``b`` (the closed form; by autograd for a framework loss)."""
    spec = get_loss(name)
    return closed_form(
        b, softmax_view(b), spec, LossParams(**params), agg or Aggregation()
    ).coefficient


def rel(actual: Tensor, expected: Tensor) -> float:
    """max|a − b| / max|b| over the valid tokens of the batch (masked c_t are 0 on both)."""
    scale = float(expected.abs().max())
    assert scale > 0, "a comparison of zero gradients proves nothing"
    return float((actual - expected).abs().max()) / scale


def length_epsilon(b: Batch) -> Tensor:
    """[N, 1] |y_i|/(|y_i| + 1e-8): verl's and OpenRLHF's seq-mean-token-mean against ours."""
    lengths = b.mask.to(F64).sum(-1, keepdim=True)
    return torch.where(lengths > 0, lengths / (lengths + VERL_EPS), 1.0)


def weight_ratio(b: Batch, mode_b: str, mode_a: str, **kw: Any) -> Tensor:
    """a_B/a_A on the valid tokens (1 elsewhere): what a different aggregation multiplies by."""
    wa = aggregation_weights(b.mask, mode_a, None, F64, kw.get("all_rows_a", False))
    wb = aggregation_weights(b.mask, mode_b, None, F64, kw.get("all_rows_b", False))
    return torch.where(b.mask, wb / torch.where(b.mask, wa, 1.0), 1.0)


def explain(b: Batch, a: str, bname: str, agg: Aggregation, **params: Any) -> list[str]:
    """The parity findings of A vs B on ``b`` in float64."""
    view = softmax_view(b)
    p = LossParams(**params)
    inputs = materialized_inputs(b, view, get_loss(a), get_loss(bname), p, agg)
    return build_parity(b, view.logp, inputs, agg, 1e-9).findings


def check_autograd_twin(b: Batch, name: str, agg: Aggregation, **params: Any) -> None:
    """The framework loss through log_softmax(W h) by autograd = its closed form."""
    spec, p = get_loss(name), LossParams(**params)
    closed = closed_form(b, softmax_view(b), spec, p, agg)
    ref = autograd_reference(b, spec, p, agg)
    assert rel(closed.coefficient, ref.coefficient.to(F64)) <= EXACT
    assert rel(closed.grad_weight, ref.grad_weight) <= EXACT


# ----------------------------------------------------------------------------- verl


@pytest.fixture(scope="module")
def verl() -> Any:
    return pytest.importorskip("verl.trainer.ppo.core_algos")


VERL_EQUAL = [
    # (verl loss, gradlens twin, loss settings, aggregation, count_empty_sequences)
    ("verl:vanilla", "ppo_clip", {}, "token_mean", False),
    ("verl:vanilla", "ppo_clip", {}, "token_sum", False),
    ("verl:vanilla", "ppo_clip", {}, "seq_mean_token_sum", False),
    ("verl:vanilla", "ppo_clip", {}, "seq_mean_token_sum_norm", False),
    # verl adds 1e-8 to |y_i|, but the engine worker's bool mask sums to int64, and
    # int64 + 1e-8 is float32, where |y_i| + 1e-8 rounds to |y_i|: no epsilon is left
    ("verl:vanilla", "ppo_clip", {}, "seq_mean_token_mean", False),
    ("verl:vanilla", "ppo_clip", {}, "seq_mean_token_sum", True),  # the trainer's S = B
    ("verl:vanilla", "ppo_clip", {"dual_clip": 3.0}, "token_mean", False),
    ("verl:gspo", "gspo_token", {}, "token_mean", False),  # 0.9 honours loss_agg_mode
    ("verl:gspo", "gspo", {}, "seq_mean_token_sum", False),  # A constant per sequence
    ("verl:cispo", "cispo", {}, "token_mean", False),  # clip_ratio_low = cispo_eps_low = 10
    ("verl:cispo", "cispo", {"cispo_eps_low": 0.2}, "token_mean", False),  # verl's default
    ("verl:gpg", "reinforce", {}, "token_mean", False),
    ("verl:vanilla+kl", "grpo", {"kl_estimator": "k3"}, "token_mean", False),  # low_var_kl
    ("verl:vanilla+kl", "grpo", {"kl_estimator": "k2"}, "seq_mean_token_sum", False),
]


@pytest.mark.parametrize(("name", "twin", "params", "mode", "all_rows"), VERL_EQUAL)
def test_verl_equals_its_twin(
    verl: Any, name: str, twin: str, params: dict, mode: str, all_rows: bool
) -> None:
    b = frameworks_batch(drift=1.0 if "dual_clip" in params else 0.3)
    agg = Aggregation(mode, None, all_rows)
    assert rel(coefficient(b, name, agg, **params), coefficient(b, twin, agg, **params)) <= EXACT


def test_verl_sapo_forces_seq_mean_token_mean(verl: Any) -> None:
    # under token_mean verl's SAPO still aggregates seq-mean-token-mean (0.7–0.9)
    b = frameworks_batch()
    ours = coefficient(b, "sapo", Aggregation("token_mean"))
    factor = weight_ratio(b, "seq_mean_token_mean", "token_mean")
    assert rel(coefficient(b, "verl:sapo", Aggregation("token_mean")), factor * ours) <= EXACT
    notes = explain(b, "sapo", "verl:sapo", Aggregation("token_mean"))
    assert any(
        "N_tok/(B'·|y_i|)" in n and "token_mean (A) vs seq_mean_token_mean" in n for n in notes
    )


def test_verl_rejection_sampling_renormalises(verl: Any) -> None:
    # verl's rollout_rs removes rejected sequences from the mask: c_verl = N_tok/N_kept · c_ours
    # under token_mean; gradlens's geo_mask with renormalize: true computes the same
    b = frameworks_batch()
    band = {"kind": "geo_mask", "low": 0.97, "high": 1 / 0.97}
    plain, renorm = Correction(**band), Correction(**band, renormalize=True)
    verl_c = coefficient(b, "verl:vanilla", corrections=(plain,))
    ours = closed_form(
        b, softmax_view(b), get_loss("ppo_clip"), LossParams(corrections=(plain,)), Aggregation()
    )
    kept = b.mask & ~ours.terms.regions["seq_geo_masked"]
    assert 0 < int(kept.sum()) < int(b.mask.sum())
    n_tok, n_kept = float(b.mask.sum()), float(kept.sum())
    assert rel(verl_c, n_tok / n_kept * ours.coefficient) <= EXACT
    assert rel(verl_c, coefficient(b, "ppo_clip", corrections=(renorm,))) <= EXACT
    notes = explain(b, "ppo_clip", "verl:vanilla", Aggregation(), corrections=(plain,))
    assert any(f"N_tok/N_kept = {n_tok:g}/{n_kept:g}" in n for n in notes)


@pytest.mark.parametrize(
    "correction", [Correction("token_tis", None, 1.05), Correction("icepop", 0.95, 1.05)]
)
def test_verl_importance_weights_equal_ours(verl: Any, correction: Correction) -> None:
    b = frameworks_batch()
    ours = coefficient(b, "ppo_clip", corrections=(correction,))
    assert rel(coefficient(b, "verl:vanilla", corrections=(correction,)), ours) <= EXACT


def test_verl_rejection_chain_equals_ours_renormalised(verl: Any) -> None:
    # verl's rollout_rs "token_k1,seq_max_k3" (thresholds "0.9_1.1,0.01") removes the tokens
    # either option rejects from the response mask: gradlens's two kinds with renormalize: true
    b = frameworks_batch()
    chain = (
        Correction("token_k1", 0.9, 1.1, renormalize=True),
        Correction("seq_max_k3", None, 0.01, renormalize=True),
    )
    ours = closed_form(
        b, softmax_view(b), get_loss("ppo_clip"), LossParams(corrections=chain), Aggregation()
    )
    rejected = ours.terms.regions["rs_token_k1_masked"] | ours.terms.regions["seq_rs_max_k3_masked"]
    assert 0 < int(rejected.sum()) < int(b.mask.sum())
    assert rel(coefficient(b, "verl:vanilla", corrections=chain), ours.coefficient) <= EXACT


def test_verl_batch_normalised_weights_equal_ours(verl: Any) -> None:
    # verl's masked mean divides by N_tok + 1e-8: a relative 1e-8/N_tok ≪ 1e-9
    b = frameworks_batch()
    c = Correction("token_tis", None, 1.05, batch_normalize=True)
    ours = coefficient(b, "ppo_clip", corrections=(c,))
    plain = coefficient(b, "ppo_clip", corrections=(Correction("token_tis", None, 1.05),))
    assert rel(ours, plain) > 1e-3  # the normalisation changes c_t
    assert rel(coefficient(b, "verl:vanilla", corrections=(c,)), ours) <= 1e-9


def test_verl_bypass_mode_is_ppo_clip_against_the_rollout(verl: Any) -> None:
    b = frameworks_batch()
    assert b.rollout_logp is not None
    against_rollout = dataclasses.replace(b, old_logp=b.rollout_logp)
    assert rel(coefficient(b, "verl:bypass_mode"), coefficient(against_rollout, "ppo_clip")) <= (
        EXACT
    )


def test_verl_clip_cov_zeroes_a_few_tokens_of_ppo_clip(verl: Any) -> None:
    # clip_cov detaches max(1, ⌊2e-4·N_tok⌋) randomly drawn tokens whose covariance lies in
    # (1, 5); everywhere else it is PPO-clip without the dual clip
    b = frameworks_batch(drift=0.6)
    theirs, ours = coefficient(b, "verl:clip_cov"), coefficient(b, "ppo_clip")
    differ = (theirs - ours).abs() > EXACT * float(ours.abs().max())
    assert int(differ.sum()) <= 1 and bool((theirs[differ] == 0).all())


def test_verl_kl_cov_changes_exactly_one_token_of_ppo(verl: Any) -> None:
    # kl_cov is unclipped −A·r plus ppo_kl_coef·|log r| on the top max(1, ⌊2e-4·N_tok⌋) tokens
    b = frameworks_batch()
    theirs, ours = coefficient(b, "verl:kl_cov"), coefficient(b, "ppo")
    differ = (theirs - ours).abs() > EXACT * float(ours.abs().max())
    assert int(differ.sum()) == 1


def test_verl_geo_mean_is_gmpo_over_every_row(verl: Any) -> None:
    # c = −Â_i·s_i·M_t/(|y_i|·B): torch.mean over all B = 8 rows, the empty one too; M_t = 0
    # where the sign-aware clip of log r picks the clamped branch. verl writes |y_i| + 1e-8,
    # which the bool mask turns into float32, where the 1e-8 rounds away (as in vanilla)
    b = frameworks_batch()
    view = softmax_view(b)
    m = b.mask.to(F64)
    log_r = torch.where(b.mask, view.logp - b.old_logp, 0.0)
    sign = torch.sign(b.advantages)
    clamped = log_r.clamp(-0.2, 0.28)
    kept = (sign * log_r <= sign * clamped) | (log_r == clamped)
    lengths = m.sum(-1, keepdim=True).clamp(min=1)
    chosen = torch.where(kept, log_r, clamped)
    s = torch.exp((chosen * m).sum(-1, keepdim=True) / lengths)
    adv = (b.advantages * m).sum(-1, keepdim=True) / lengths
    expected = torch.where(b.mask & kept, -adv * s / (lengths * b.mask.shape[0]), 0.0)
    assert rel(coefficient(b, "verl:geo_mean"), expected) <= EXACT


def test_verl_dppo_is_a_capped_weight_with_a_divergence_mask(verl: Any) -> None:
    # dppo_tv/dppo_kl: −A·sg[min(r, cap)]·ℓ (cap = loss.cispo_cap) on the tokens whose
    # divergence stays within (eps_low, eps_high), 0 on the others
    b = frameworks_batch()
    ours = coefficient(b, "cispo_cap", cispo_cap=3.0)
    for name in ("verl:dppo_tv", "verl:dppo_kl"):
        theirs = coefficient(b, name, cispo_cap=3.0)
        kept = theirs != 0
        assert rel(torch.where(kept, ours, 0.0), theirs) <= EXACT
        assert int(kept.sum()) > b.num_tokens // 2, name  # the mask drops a minority


def test_verl_dro_has_a_quadratic_penalty_towards_pi_old(verl: Any) -> None:
    # per-token loss −(A·ℓ − ½β(ℓ − ℓ_old)²), β = loss.kl_coef: c = (−A + β(ℓ − ℓ_old))/N_tok
    b = frameworks_batch()
    view = softmax_view(b)
    expected = torch.where(
        b.mask, (-b.advantages + 0.04 * (view.logp - b.old_logp)) / b.num_tokens, 0.0
    )
    assert rel(coefficient(b, "verl:dro", kl_coef=0.04), expected) <= EXACT


def test_verl_losses_agree_with_autograd_through_the_logits(verl: Any) -> None:
    b = frameworks_batch()
    for name in ("verl:vanilla", "verl:gspo", "verl:sapo+kl"):
        check_autograd_twin(b, name, Aggregation("seq_mean_token_mean"))


def test_verl_names_what_it_lacks(verl: Any) -> None:
    from gradlens.errors import GradlensError

    with pytest.raises(GradlensError, match=r"has no loss 'vanila'; it has .*vanilla"):
        get_loss("verl:vanila")
    b = frameworks_batch()
    with pytest.raises(GradlensError, match=r"token_sum_norm .* has no verl twin"):
        coefficient(b, "verl:vanilla", Aggregation("token_sum_norm"))
    with pytest.raises(GradlensError, match=r"no KL estimator like loss\.kl_estimator = unbiased"):
        coefficient(b, "verl:vanilla+kl", kl_estimator="unbiased")


# ----------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl() -> Any:
    return pytest.importorskip("trl")


TRL_EQUAL = [
    # (TRL loss, gradlens twin, loss settings, aggregation, count_empty_sequences)
    ("trl:bnpo", "ppo_clip", {}, "token_mean", False),
    ("trl:dapo", "ppo_clip", {}, "token_mean", False),  # num_items_in_batch = N_tok
    ("trl:grpo", "ppo_clip", {}, "seq_mean_token_mean", True),  # divides by all B rows
    ("trl:dr_grpo", "ppo_clip", {}, "seq_mean_token_sum_norm", True),  # B·T
    ("trl:luspo", "ppo_clip", {}, "seq_mean_token_sum", True),
    ("trl:cispo", "cispo_cap", {"cispo_cap": 1.5}, "token_mean", False),  # an absolute cap
    # TRL builds its SAPO temperatures with torch.where(A > 0, τ_pos, τ_neg) from Python
    # floats, a float32 tensor: τ_neg = 1.05 becomes 1.0499999523; the same τ here is exact
    ("trl:sapo", "sapo", {"tau_neg": float(torch.tensor(1.05))}, "seq_mean_token_mean", True),
    ("trl:gspo", "gspo", {"eps_low": 3e-4, "eps_high": 4e-4}, "seq_mean_token_mean", True),
    ("trl:bnpo", "ppo_clip", {"dual_clip": 3.0}, "token_mean", False),  # TRL's delta
    ("trl:dapo", "ppo_clip", {"opsm_delta": 0.01}, "token_mean", False),  # OPSM on μ_old
    ("trl:bnpo+kl", "grpo", {"kl_estimator": "unbiased"}, "token_mean", False),  # the default
    ("trl:grpo+kl", "grpo", {"kl_estimator": "k3"}, "seq_mean_token_mean", True),
]


@pytest.mark.parametrize(("name", "twin", "params", "mode", "all_rows"), TRL_EQUAL)
def test_trl_equals_its_twin(
    trl: Any, name: str, twin: str, params: dict, mode: str, all_rows: bool
) -> None:
    b = frameworks_batch(drift=1.0 if "dual_clip" in params else 0.3)
    ours = coefficient(b, twin, Aggregation(mode, None, all_rows), **params)
    # TRL's aggregation is its loss_type's, whatever loss.aggregation says
    assert rel(coefficient(b, name, **params), ours) <= EXACT


def test_trl_grpo_divides_by_every_row(trl: Any) -> None:
    # against seq_mean_token_mean over B' = 7: c_TRL = B'/B = 7/8 · c_ours
    b = frameworks_batch()
    agg = Aggregation("seq_mean_token_mean")
    ours = coefficient(b, "ppo_clip", agg)
    assert rel(coefficient(b, "trl:grpo"), 7 / 8 * ours) <= EXACT
    notes = explain(b, "ppo_clip", "trl:grpo", agg)
    assert any("B'/B = 7/8 = 0.875" in n for n in notes)


def test_trl_kl_is_not_k3_by_default(trl: Any) -> None:
    # use_bias_correction_kl=True (TRL's default): the gradient of k3·r, gradlens's unbiased
    b = frameworks_batch()
    unbiased = coefficient(b, "grpo", kl_estimator="unbiased")
    k3 = coefficient(b, "grpo", kl_estimator="k3")
    trl_default = coefficient(b, "trl:bnpo+kl", kl_estimator="unbiased")
    assert rel(trl_default, unbiased) <= EXACT and rel(trl_default, k3) > 1e-3


def test_trl_vespo_weights_each_sequence_by_a_detached_positive_factor(trl: Any) -> None:
    # c = −φ_i·A_i/N_tok with φ_i = φ(w_i) > 0 detached, constant within each sequence
    b = frameworks_batch()
    c = coefficient(b, "trl:vespo")
    base = torch.where(b.mask, -b.advantages / b.num_tokens, 0.0)
    live = b.mask & (b.advantages != 0)
    phi = torch.where(live, c / torch.where(live, base, 1.0), 0.0)
    for i in range(b.mask.shape[0]):
        values = phi[i][live[i]]
        if values.numel():
            assert float(values.min()) > 0
            assert float((values - values[0]).abs().max()) <= EXACT * float(values[0])


def test_trl_losses_agree_with_autograd_through_the_logits(trl: Any) -> None:
    b = frameworks_batch()
    for name in ("trl:grpo", "trl:gspo+kl"):
        check_autograd_twin(b, name, Aggregation(), kl_estimator="unbiased")


# ----------------------------------------------------------------------------- OpenRLHF


@pytest.fixture(scope="module")
def openrlhf() -> Any:
    return pytest.importorskip("openrlhf")


OPENRLHF_EQUAL = [
    ("openrlhf:ppo", "ppo_clip", {}, "token_mean"),
    ("openrlhf:ppo", "ppo_clip", {"dual_clip": 3.0}, "token_mean"),
    (
        "openrlhf:ppo",
        "ppo_clip",
        {"corrections": (Correction("icepop", 0.95, 1.05),)},
        "token_mean",
    ),
    (
        "openrlhf:ppo",
        "ppo_clip",
        {"corrections": (Correction("token_tis", 0.95, 1.05),)},
        "token_mean",
    ),
    (
        "openrlhf:ppo",
        "ppo_clip",
        # OpenRLHF's seq mask keeps the token ρ (A13): geo_mask and an unbounded token_mis
        {"corrections": (Correction("geo_mask", 0.97, 1.03), Correction("token_mis"))},
        "token_mean",
    ),
    # ... which is the seq_mask_tis kind (NeMo RL's and OpenRLHF's seq-mask-tis)
    (
        "openrlhf:ppo",
        "ppo_clip",
        {"corrections": (Correction("seq_mask_tis", 0.97, 1.03),)},
        "token_mean",
    ),
]


@pytest.mark.parametrize(("name", "twin", "params", "mode"), OPENRLHF_EQUAL)
def test_openrlhf_equals_its_twin(
    openrlhf: Any, name: str, twin: str, params: dict, mode: str
) -> None:
    b = frameworks_batch(drift=1.0 if "dual_clip" in params else 0.3)
    agg = Aggregation(mode)
    assert rel(coefficient(b, name, agg, **params), coefficient(b, twin, agg, **params)) <= EXACT


@pytest.mark.parametrize(
    ("name", "twin"), [("openrlhf:ppo", "ppo_clip"), ("openrlhf:gspo", "gspo")]
)
def test_openrlhf_seq_mean_differs_by_its_length_epsilon(
    openrlhf: Any, name: str, twin: str
) -> None:
    b = frameworks_batch()
    agg = Aggregation("seq_mean_token_mean")
    assert rel(coefficient(b, name, agg), length_epsilon(b) * coefficient(b, twin, agg)) <= EXACT


def test_openrlhf_kl_is_a_token_mean_in_float32(openrlhf: Any) -> None:
    b = frameworks_batch()
    # token_mean: the float32 KL leaves a rounding gap the report calls float32
    tok = Aggregation("token_mean")
    gap = rel(coefficient(b, "openrlhf:ppo+kl", tok), coefficient(b, "grpo", tok))
    assert 1e-9 < gap <= FLOAT32_KL
    assert any(
        "one side computes in float32" in n for n in explain(b, "grpo", "openrlhf:ppo+kl", tok)
    )
    # seq_mean_token_mean: the policy term follows it, the KL stays a token mean
    seq = Aggregation("seq_mean_token_mean")
    policy = length_epsilon(b) * coefficient(b, "ppo_clip", seq)
    kl_tok = coefficient(b, "grpo", tok) - coefficient(b, "ppo_clip", tok)
    assert rel(coefficient(b, "openrlhf:ppo+kl", seq), policy + kl_tok) <= FLOAT32_KL
    assert rel(coefficient(b, "openrlhf:ppo+kl", seq), coefficient(b, "grpo", seq)) > 1e-3


def test_openrlhf_runs_its_installed_loss_file(openrlhf: Any) -> None:
    # whichever import route was taken, PolicyLoss is the class of the installed models/loss.py
    import inspect
    from pathlib import Path

    from gradlens.losses.frameworks.openrlhf import openrlhf_api

    api = openrlhf_api("openrlhf:ppo")
    installed = Path(openrlhf.__file__).resolve().parent / "models"
    assert Path(inspect.getfile(api.loss.PolicyLoss)).resolve() == installed / "loss.py"
    assert Path(inspect.getfile(api.utils.compute_approx_kl)).resolve() == installed / "utils.py"


def test_openrlhf_losses_agree_with_autograd_through_the_logits(openrlhf: Any) -> None:
    check_autograd_twin(frameworks_batch(), "openrlhf:gspo", Aggregation("seq_mean_token_mean"))


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "pair"),
    [
        ("verl.trainer.ppo.core_algos", "ppo_clip,verl:vanilla"),
        ("trl", "ppo_clip,trl:bnpo"),
        ("openrlhf", "ppo_clip,openrlhf:ppo"),
    ],
)
def test_the_documented_command_passes(module: str, pair: str) -> None:
    pytest.importorskip(module)
    result = CliRunner().invoke(app, ["compare", "--parity", pair, "--check"])
    assert result.exit_code == 0, result.output
