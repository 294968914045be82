"""Training–inference corrections (gradlens.losses.corrections): their weights against
losses.md §8 written out, agreement with autograd for every loss, and the hand-computed case.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import F64, literal_config, random_batch, rel_err, three_policy_batch

from gradlens.compare import run_compare
from gradlens.config import build_config, validate
from gradlens.containers import Batch
from gradlens.errors import GradlensError
from gradlens.grads import autograd_reference, closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction
from gradlens.losses.corrections import KINDS, with_defaults
from gradlens.results import CompareReport, LossReport

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
E0_MINUS_PI = [0.5, -0.2, -0.15, -0.1, -0.05]
ABS = 1e-12  # float64 literal cases: only the rounding of z = log π and softmax(z) (~1e-16)
# Closed form vs autograd in float64: the same formula in two orders, a few ulps times the
# number of summed terms and max r ≤ e²; 1e-12 keeps 100× margin (formula errors are O(1)).
TOL_F64 = 1e-12
POLICY_LOSSES = ["grpo", "gspo", "gspo_token", "cispo", "cispo_cap", "sapo", "minirl"]


def run(path: str, *overrides: str) -> CompareReport:
    report = run_compare(build_config(CONFIGS / path, overrides))
    assert report.passed, [c for c in report.checks if not c.passed]
    return report


def loss(report: CompareReport, name: str) -> LossReport:
    return next(r for r in report.losses if r.name == name)


def grad(report: CompareReport, name: str, k: int = 0) -> list[float | None]:
    tokens = loss(report, name).tokens
    assert tokens is not None
    return tokens[k].grad_logits


def scaled(c: float) -> list[float]:
    return [c * x for x in E0_MINUS_PI]


# ----------------------------------------------------------------------------- corrections


CORRECTIONS = {
    "token_tis": Correction("token_tis", None, 1.1),
    "token_tis_two_sided": Correction("token_tis", 0.9, 1.1),
    "seq_tis": Correction("seq_tis", None, 1.5),
    "token_mis": Correction("token_mis", 0.8, 1.2),
    "seq_mis": Correction("seq_mis", None, 1.5),
    "icepop": Correction("icepop", 0.8, 1.25),
    "geo_mask": Correction("geo_mask", 0.95, 1.05),
}


def rho_weight(batch: Batch, c: Correction) -> torch.Tensor:
    """The weight written out from losses.md §8, not from gradlens."""
    m = batch.mask
    assert batch.rollout_logp is not None
    log_rho = torch.where(m, batch.old_logp - batch.rollout_logp, 0.0)
    rho = log_rho.exp()
    rho_seq = log_rho.sum(-1, keepdim=True).exp().expand_as(rho)
    geo = (log_rho.sum(-1) / m.sum(-1).clamp(min=1)).exp()[:, None].expand_as(rho)
    lo = -math.inf if c.low is None else c.low
    hi = math.inf if c.high is None else c.high
    inside = {
        "token": (rho >= lo) & (rho <= hi),
        "seq": (rho_seq >= lo) & (rho_seq <= hi),
        "geo": (geo >= lo) & (geo <= hi),
    }
    w = {
        "token_tis": rho.clamp(min=c.low, max=c.high),
        "seq_tis": rho_seq.clamp(min=c.low, max=c.high),
        "token_mis": torch.where(inside["token"], rho, 0.0),
        "icepop": torch.where(inside["token"], rho, 0.0),
        "seq_mis": torch.where(inside["seq"], rho_seq, 0.0),
        "geo_mask": inside["geo"].to(F64),
    }[c.kind]
    return torch.where(m, w, 0.0)


@pytest.mark.parametrize("name", list(CORRECTIONS))
def test_correction_weights_match_their_definition(name: str) -> None:
    batch = three_policy_batch(7)
    c = CORRECTIONS[name]
    view = softmax_view(batch)
    params = LossParams(corrections=(c,))
    base = closed_form(batch, view, get_loss("ppo_clip"), LossParams(), Aggregation())
    corrected = closed_form(batch, view, get_loss("ppo_clip"), params, Aggregation())
    w = rho_weight(batch, c)
    assert int(((w != 1) & batch.mask).sum()) > 0  # the correction does something here
    assert rel_err(corrected.coefficient, w * base.coefficient) <= TOL_F64
    region = corrected.terms.regions[KINDS[c.kind].region]
    if c.kind.endswith("tis"):
        assert int(region.sum()) > 0  # some tokens truncated
    else:
        assert torch.equal(region, (w == 0) & batch.mask)  # exactly the masked tokens


@pytest.mark.parametrize(
    "mode, factor",
    [
        # token_mean: kept tokens weigh 1/N_kept instead of 1/N_tok
        ("token_mean", lambda m, k: m.sum().double() / k.sum()),
        # seq_mean_token_mean: 1/(B'_kept·|y_i|) instead of 1/(B'·|y_i|) (geo_mask rejects
        # whole sequences, so |y_i| of a kept sequence does not change)
        ("seq_mean_token_mean", lambda m, k: m.any(-1).sum().double() / k.any(-1).sum()),
        ("token_sum", lambda m, k: torch.tensor(1.0)),  # no normaliser to shrink
    ],
)
def test_a_renormalising_rejection_shrinks_the_normaliser(mode: str, factor) -> None:
    batch = three_policy_batch(7)
    view = softmax_view(batch)
    # the band rejects 2 of the 8 sequences (7 of 32 tokens) on this batch
    plain = Correction("geo_mask", 0.85, 1.15)
    renorm = Correction("geo_mask", 0.85, 1.15, renormalize=True)
    agg = Aggregation(mode)
    a = closed_form(batch, view, get_loss("ppo_clip"), LossParams(corrections=(plain,)), agg)
    b = closed_form(batch, view, get_loss("ppo_clip"), LossParams(corrections=(renorm,)), agg)
    rejected = a.terms.regions["seq_geo_masked"]
    kept = batch.mask & ~rejected
    assert 0 < int(rejected.sum()) < int(batch.mask.sum())  # some rejected, some kept
    assert int((a.coefficient != 0).sum()) > 1  # and the kept tokens have a gradient
    expected = float(factor(batch.mask, kept))
    assert rel_err(b.coefficient, expected * a.coefficient) <= TOL_F64
    assert float(b.agg_weights[rejected].abs().max()) == 0.0  # out of the normaliser too
    check_agreement(batch, "ppo_clip", LossParams(corrections=(renorm,)), agg)


def test_renormalize_is_for_the_kinds_that_reject() -> None:
    ok = validate({"loss": {"corrections": [{"kind": "icepop", "renormalize": True}]}})
    assert ok.loss.params().corrections[0].renormalize
    with pytest.raises(GradlensError, match="renormalize applies to the kinds that reject"):
        validate({"loss": {"corrections": [{"kind": "token_tis", "renormalize": True}]}})


def cycled(names: list[str], others: list[str]) -> list[tuple[str, str, str]]:
    """(name, other, aggregation) for every pair, the aggregation cycling so that each name and
    each other meets every aggregation (the full product is 4× slower and adds nothing)."""
    modes = list(AGGREGATIONS)
    return [
        (a, b, modes[(i + j) % len(modes)])
        for i, a in enumerate(names)
        for j, b in enumerate(others)
    ]


@pytest.mark.parametrize("loss_name, name, mode", cycled(loss_names(), list(CORRECTIONS)))
def test_corrections_agree_with_autograd_for_every_loss(
    loss_name: str, name: str, mode: str
) -> None:
    batch = three_policy_batch(3)
    params = LossParams(corrections=(CORRECTIONS[name],), entropy_coef=0.05)
    check_agreement(batch, loss_name, params, Aggregation(mode, 5.0))


SETTINGS = {
    "k1": LossParams(kl_estimator="k1"),
    "k2": LossParams(kl_estimator="k2"),
    "unbiased": LossParams(kl_estimator="unbiased", kl_coef=0.5),
    "decoupled": LossParams(minirl_truncation="decoupled", minirl_cap=1.5),
    "literal_cap": LossParams(minirl_cap=1.5),
    "tau": LossParams(tau_pos=3.0, tau_neg=0.5),
    "cispo_bounds": LossParams(cispo_eps_low=0.3, cispo_eps_high=0.1, cispo_cap=1.2),
    "entropy": LossParams(entropy_coef=0.3),
}


@pytest.mark.parametrize(
    "loss_name, setting, mode", cycled([*POLICY_LOSSES, "reinforce", "ppo_clip"], list(SETTINGS))
)
def test_corrections_and_settings_agree_with_autograd(
    loss_name: str, setting: str, mode: str
) -> None:
    # Three policies and a reference, so every path of every policy loss is differentiated.
    check_agreement(three_policy_batch(5), loss_name, SETTINGS[setting], Aggregation(mode, 5.0))


def check_agreement(batch: Batch, loss_name: str, params: LossParams, agg: Aggregation) -> None:
    spec = get_loss(loss_name)
    closed = closed_form(batch, softmax_view(batch), spec, params, agg)
    ref = autograd_reference(batch, spec, params, agg)
    m = batch.mask
    assert float(closed.grad_weight.abs().max()) > 0
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)
    # zero-sum, entropy bonus included: every row of ∂L/∂z sums to 0
    scale = float(closed.grad_logits.abs().max())
    assert float(closed.grad_logits.sum(-1).abs().max()) <= 1e-13 * max(scale, 1.0)


def test_the_kl_penalty_is_not_weighted_by_corrections() -> None:
    batch = three_policy_batch(9)
    view = softmax_view(batch)
    c = Correction("token_mis", 0.9, 1.1)
    grpo = closed_form(batch, view, get_loss("grpo"), LossParams(corrections=(c,)), Aggregation())
    plain = closed_form(batch, view, get_loss("grpo"), LossParams(), Aggregation())
    ppo = closed_form(batch, view, get_loss("ppo_clip"), LossParams(), Aggregation())
    kl_part = plain.coefficient - ppo.coefficient
    w = rho_weight(batch, c)
    assert rel_err(grpo.coefficient, w * ppo.coefficient + kl_part) <= TOL_F64
    masked = (w == 0) & batch.mask
    assert bool(masked.any())
    assert grpo.coefficient[masked].tolist() == pytest.approx(kl_part[masked].tolist(), abs=1e-15)


def test_corrections_need_rollout_log_probs() -> None:
    batch = random_batch(1)
    params = LossParams(corrections=(with_defaults("token_tis", None, None),))
    with pytest.raises(GradlensError, match=r"source\.rollout_drift"):
        closed_form(batch, softmax_view(batch), get_loss("ppo_clip"), params, Aggregation())


def test_correction_defaults() -> None:
    assert with_defaults("token_tis", None, None) == Correction("token_tis", None, 2.0)
    assert with_defaults("icepop", None, None) == Correction("icepop", 0.5, 5.0)
    assert with_defaults("geo_mask", None, 1.01) == Correction("geo_mask", 0.999, 1.01)


@pytest.mark.slow
def test_corrections_in_config_and_report() -> None:
    config = validate(
        {
            "losses": ["ppo_clip", "gspo"],
            "source": {"vocab_size": 128, "num_sequences": 8, "rollout_drift": 0.3},
            # geo_mask at ±10%: its default ±0.1% masks every sequence at this drift (the gate
            # would fail the batch as undiagnosable)
            "loss": {
                "corrections": [
                    {"kind": "seq_mis", "high": 1.2},
                    {"kind": "geo_mask", "low": 0.9, "high": 1.1},
                ]
            },
        }
    )
    report = run_compare(config)
    assert report.passed
    for r in report.losses:
        assert {"seq_mis_masked", "seq_geo_masked"} <= r.clipping.shares.keys()
        assert {"seq_mis_masked", "seq_geo_masked"} <= r.clipping.sequence_shares.keys()
    assert report.rollout is not None and report.rollout.count == report.batch.num_tokens


# ----------------------------------------------------------------------------- docs §7 cases


def literal(
    sequences: list[list[dict]], losses: list[str], failing: tuple[str, ...] = (), **loss: object
) -> CompareReport:
    """The report of a literal batch: every check passes except exactly the ``failing`` ones."""
    report = run_compare(literal_config(sequences, losses, **loss))
    failed = sorted(c.name for c in report.checks if not c.passed)
    assert failed == sorted(failing), [c for c in report.checks if not c.passed]
    return report


def coefficients(report: CompareReport, name: str) -> list[float | None]:
    tokens = loss(report, name).tokens
    assert tokens is not None
    return [t.coefficient for t in tokens]


def test_tc_corrections_on_reinforce() -> None:
    # π_old(y) = 0.4, μ_old(y) = 0.1: ρ = 4; reinforce with A = +1, weight 1
    pos = {**position(), "old_prob": 0.4, "rollout_prob": 0.1}
    one = {"aggregation": "token_sum"}
    cases = {
        "token_tis": (-2.0, "tis_truncated", 1.0),  # w = min(4, 2)
        "token_mis": (0.0, "mis_masked", 1.0),  # 4 > 3: masked
        "icepop": (-4.0, "icepop_masked", 0.0),  # 0.5 ≤ 4 ≤ 5: w = ρ = 4
    }
    for kind, (c, region, share) in cases.items():
        # a masked only token leaves no gradient: the gate fails the batch, and says why
        failing = ("diagnosable",) if c == 0.0 else ()
        report = literal([[pos]], ["reinforce"], failing, corrections=[{"kind": kind}], **one)
        r = loss(report, "reinforce")
        assert coefficients(report, "reinforce") == pytest.approx([c], abs=1e-12), kind
        assert grad(report, "reinforce") == pytest.approx(scaled(c), abs=1e-12), kind
        assert r.clipping.shares[region] == share, kind
    # two tokens with ρ = 4 and 0.25: Π ρ = 1 and exp(mean log ρ) = 1
    seq = [pos, {**position(), "old_prob": 0.1, "rollout_prob": 0.4}]
    for kind, expected in (
        ("seq_tis", [-1.0, -1.0]),
        ("seq_mis", [-1.0, -1.0]),
        ("geo_mask", [-1.0, -1.0]),
        ("token_tis", [-2.0, -0.25]),
    ):
        report = literal([seq], ["reinforce"], corrections=[{"kind": kind}], **one)
        assert coefficients(report, "reinforce") == pytest.approx(expected, abs=1e-12), kind


def position(**extra: object) -> dict:
    return {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 0, "advantage": 1.0, **extra}
