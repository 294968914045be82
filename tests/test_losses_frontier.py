"""The frontier losses (grpo, gspo, gspo_token, cispo, cispo_cap, sapo, minirl), the
training–inference corrections, the entropy bonus and the three-policy sources.

Hand-computed vectors come from losses.md §12 (TC6, TC9, TC10, TC11, TC13) through the shipped
literal configs; the arithmetic is in each config's header and repeated here where it is used.
Setting for all of them: V = 5, π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0, e_0 − π =
[0.5, −0.2, −0.15, −0.1, −0.05] with norm √0.325 = 0.570088.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import F64, build_batch, literal_config, random_batch, rel_err

from gradlens.compare import run_compare
from gradlens.config import Config, build_config, validate
from gradlens.containers import Batch
from gradlens.errors import GradlensError
from gradlens.grads import autograd_reference, closed_form, softmax_view, token_inputs
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction
from gradlens.losses.corrections import KINDS, with_defaults
from gradlens.results import CompareReport, LossReport

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
E0_MINUS_PI = [0.5, -0.2, -0.15, -0.1, -0.05]
ABS = 1e-12  # float64 literal cases: only the rounding of z = log π and softmax(z) (~1e-16)
# Closed form vs autograd in float64: the same formula in two orders, a few ulps times the
# number of summed terms and max r ≤ e²; 1e-12 keeps 100× margin (formula errors are O(1)).
TOL_F64 = 1e-12
NEW_LOSSES = ["grpo", "gspo", "gspo_token", "cispo", "cispo_cap", "sapo", "minirl"]


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


# ----------------------------------------------------------------------------- registry


def test_every_new_loss_is_registered_with_its_maths() -> None:
    for name in NEW_LOSSES:
        spec = get_loss(name)
        assert name in loss_names()
        assert spec.formula and spec.grad_formula and spec.zero_when and spec.paper


# ----------------------------------------------------------------------------- TC6


def test_tc6_cispo_in_both_parametrisations() -> None:
    report = run("literal_tc6_cispo.yaml")
    # verl/slime: weight clip(2, 1 − 10, 1.28) = 1.28, g = −1.28
    assert grad(report, "cispo") == pytest.approx([-0.64, 0.256, 0.192, 0.128, 0.064], abs=ABS)
    assert math.hypot(*grad(report, "cispo")) == pytest.approx(0.729712, abs=1e-6)  # type: ignore[arg-type]
    assert loss(report, "cispo").clipping.shares == {"weight_clipped": 1.0}  # verl pg_clipfrac
    # TRL: weight min(2, ε_max = 5) = 2, g = −2
    assert grad(report, "cispo_cap") == pytest.approx([-1.0, 0.4, 0.3, 0.2, 0.1], abs=ABS)
    shares = loss(report, "cispo_cap").clipping.shares
    assert shares == {"weight_capped": 0.0, "weight_capped_pos": 0.0}  # TRL cispo_clip_ratio
    # PPO-clip at the same r = 2 > 1.28 with A > 0: clipped, no gradient at all
    assert grad(report, "ppo_clip") == pytest.approx([0.0] * 5, abs=ABS)
    assert loss(report, "ppo_clip").clipping.region == 1.0


def test_cispo_cap_counts_only_positive_advantages_as_trl_does() -> None:
    # A = −1, r = 2 > ε_max = 1.5: capped (weight 1.5, g = +1.5) but TRL's ratio counts A > 0 only
    report = run("literal_tc6_cispo.yaml", "loss.cispo_cap=1.5")
    assert grad(report, "cispo_cap") == pytest.approx(scaled(-1.5), abs=ABS)
    negative = validate(
        {
            "dtype": "float64",
            "losses": ["cispo_cap"],
            "loss": {"cispo_cap": 1.5, "aggregation": "seq_mean_token_sum_norm"},
            "diagnostics": {"token_details": "on"},
            "source": {
                "kind": "literal",
                "sequences": [
                    {
                        "positions": [
                            {
                                "probs": [0.5, 0.2, 0.15, 0.1, 0.05],
                                "token": 0,
                                "old_prob": 0.25,
                                "advantage": -1.0,
                            }
                        ]
                    }
                ],
            },
        }
    )
    shares = run_compare(negative).losses[0].clipping.shares
    assert shares == {"weight_capped": 1.0, "weight_capped_pos": 0.0}


# ----------------------------------------------------------------------------- TC9


def test_tc9_sapo_soft_gate() -> None:
    report = run("literal_tc9_sapo.yaml")
    r = loss(report, "sapo")
    # (a) A = +1, τ = 1: σ(0.25) = 0.562177, w = 0.984536, g = −1.25·w = −1.230670
    assert grad(report, "sapo", 0) == pytest.approx(
        [-0.615335, 0.246134, 0.184601, 0.123067, 0.061534], abs=1e-6
    )
    # (b) A = −1, τ = 1.05: σ(0.2625) = 0.565251, w = 0.982969, g = +1.228712
    assert grad(report, "sapo", 1) == pytest.approx(
        [0.614356, -0.245742, -0.184307, -0.122871, -0.061436], abs=1e-6
    )
    # (c) on-policy: w = 1, SAPO is REINFORCE (TC1a)
    assert grad(report, "sapo", 2) == pytest.approx(scaled(-1.0), abs=ABS)
    assert r.tokens is not None
    assert r.tokens[0].coefficient == pytest.approx(-1.230670, abs=1e-6)
    # loss: −A·(4/τ)·σ: −2.248706 + 2.153336 − 2 (on-policy: 4σ(0) = 2), weight 1 each
    assert r.loss == pytest.approx(-2.248706 + 2.153336 - 2.0, abs=1e-6)
    assert r.metrics["sapo_gate"] == pytest.approx(0.984536 + 0.982969 + 1.0, abs=1e-6)
    assert r.clipping.region is None  # SAPO has no clip rule


# ----------------------------------------------------------------------------- TC10

TC10 = {
    # estimator: (D, ∂D/∂ℓ) at π_θ(y) = 0.5, π_ref(y) = 0.25, π_old(y) = 0.4
    "k1": (0.693147, 1.0),  # log 2; 1
    "k2": (0.240227, 0.693147),  # ½ log² 2; log 2
    "k3": (0.193147, 0.5),  # e^u − u − 1 at u = −log 2: ½ + log 2 − 1; 1 − ½
    "unbiased": (0.241434, 0.866434),  # r = 1.25 times k3; 1.25·log 2
}


@pytest.mark.parametrize("estimator", list(TC10))
def test_tc10_kl_estimators(estimator: str) -> None:
    value, slope = TC10[estimator]
    report = run("literal_tc10_kl.yaml", f"loss.kl_estimator={estimator}")
    r = loss(report, "grpo")
    assert r.loss == pytest.approx(value, abs=1e-6)  # β = 1, weight 1, A = 0
    assert r.metrics["kl"] == pytest.approx(value, abs=1e-6)
    assert grad(report, "grpo") == pytest.approx(scaled(slope), abs=1e-6)
    assert not any("reference" in f for f in r.findings)  # π_ref was stated


def test_unbiased_kl_differentiates_through_the_ratio() -> None:
    # A detached ratio would give r·(1 − π_ref/π_θ) = 1.25·0.5 = 0.625 instead of 0.866434 (A9).
    report = run("literal_tc10_kl.yaml", "loss.kl_estimator=unbiased")
    tokens = loss(report, "grpo").tokens
    assert tokens is not None and tokens[0].coefficient is not None
    assert tokens[0].coefficient == pytest.approx(1.25 * math.log(2), abs=1e-12)


def test_grpo_without_a_reference_uses_pi_old_and_says_so() -> None:
    # no ref_prob: π_ref := π_old = 0.4, k3 slope 1 − 0.4/0.5 = 0.2
    config = build_config(CONFIGS / "literal_tc10_kl.yaml")
    data = config.model_dump(mode="json")
    del data["source"]["sequences"][0]["positions"][0]["ref_prob"]
    report = run_compare(validate(data))
    assert report.losses[0].tokens is not None
    assert report.losses[0].tokens[0].coefficient == pytest.approx(0.2, abs=1e-12)
    assert any("π_old stands in for the reference" in f for f in report.losses[0].findings)


# ----------------------------------------------------------------------------- TC11


def test_tc11_entropy_bonus() -> None:
    report = run("literal_tc11_entropy.yaml")
    r = loss(report, "reinforce")
    expected = [0.319964, -0.055273, -0.084607, -0.096951, -0.083133]
    for k in (0, 1):  # y = 0 and y = 3: the same vector, independent of the sampled token
        g = grad(report, "reinforce", k)
        assert g == pytest.approx(expected, abs=1e-6)
        assert sum(g) == pytest.approx(0.0, abs=1e-15)  # type: ignore[arg-type]
        assert math.hypot(*g) == pytest.approx(0.359027, abs=1e-6)  # type: ignore[arg-type]
    assert r.loss == pytest.approx(-2 * 1.333074, abs=1e-6)  # −c_H·Σ_t H_t, weight 1 each
    assert r.tokens is not None and r.tokens[0].coefficient == 0.0  # c_t excludes the bonus
    assert "entropy bonus excluded" in r.sampled_row.post_formula
    assert any("entropy bonus" in f for f in r.findings)


def test_entropy_bonus_adds_to_the_policy_gradient() -> None:
    # A = +1 instead of 0: grad = −(e_0 − π) + TC11 (linear superposition)
    config = build_config(CONFIGS / "literal_tc11_entropy.yaml")
    data = config.model_dump(mode="json")
    data["source"]["sequences"][0]["positions"][0]["advantage"] = 1.0
    report = run_compare(validate(data))
    assert report.passed
    expected = [-0.5 + 0.319964, 0.2 - 0.055273, 0.15 - 0.084607, 0.1 - 0.096951, 0.05 - 0.083133]
    assert grad(report, "reinforce", 0) == pytest.approx(expected, abs=1e-6)
    # the post's formula is checked on the policy term only, and holds exactly
    assert report.losses[0].sampled_row.post_max_rel_err == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- TC13


@pytest.mark.parametrize(
    "mode, a1, a2",
    [
        ("token_mean", 1 / 4, 1 / 4),
        ("seq_mean_token_mean", 1 / 2, 1 / 6),
        ("seq_mean_token_sum", 1 / 2, 1 / 2),
        ("seq_mean_token_sum_norm", 1 / 3, 1 / 3),  # L_scale = the padded length 3
    ],
)
def test_tc13_weights_for_the_new_losses(mode: str, a1: float, a2: float) -> None:
    report = run("literal_tc13_aggregation.yaml", f"loss.aggregation={mode}")
    for r in report.losses:
        assert r.tokens is not None
        weights = [t.weight for t in r.tokens]
        coefficients = [t.coefficient for t in r.tokens]
        assert weights == pytest.approx([a1, a2, a2, a2], abs=ABS), r.name
        # on-policy, g = −A: c = −a1 on seq 1 (A = +1), +a2 on seq 2 (A = −1)
        assert coefficients == pytest.approx([-a1, a2, a2, a2], abs=ABS), r.name


# ----------------------------------------------------------------------------- MiniRL (A1)


def test_minirl_literal_truncation() -> None:
    report = run("literal_minirl_truncation.yaml")
    r = loss(report, "minirl")
    assert r.tokens is not None
    # seq 1: min(π_θ/μ_old, 5) = min(0.5/0.09, 5) = 5; seq 2: 0.5/0.125 = 4; seq 3 clipped
    assert [t.coefficient for t in r.tokens] == pytest.approx([-5.0, -4.0, 0.0], abs=1e-12)
    assert grad(report, "minirl", 0) == pytest.approx([-2.5, 1.0, 0.75, 0.5, 0.25], abs=1e-12)
    assert r.clipping.shares["is_truncated"] == pytest.approx(1 / 3)
    assert r.clipping.lower == pytest.approx(1 / 3)
    assert report.rollout is not None  # μ_old was stated


def test_minirl_decoupled_truncation() -> None:
    report = run("literal_minirl_truncation.yaml", "loss.minirl_truncation=decoupled")
    r = loss(report, "minirl")
    assert r.tokens is not None
    # seq 1: r·min(ρ, 5) = 1.25·min(0.4/0.09, 5) = 1.25·4.4444 = 5.5556 = π_θ/μ_old
    assert [t.coefficient for t in r.tokens] == pytest.approx([-0.5 / 0.09, -4.0, 0.0], abs=1e-12)
    assert grad(report, "minirl", 0) == pytest.approx(scaled(-0.5 / 0.09), abs=1e-12)
    assert r.clipping.shares["is_truncated"] == 0.0


def test_minirl_without_caps_is_decoupled_ppo_with_the_rollout_ratio() -> None:
    # With no cap binding, both readings give g = −A·M·π_θ/μ_old (losses.md §2.3, item 2).
    batch = three_policy_batch(5)
    for reading in ("literal", "decoupled"):
        params = LossParams(minirl_cap=1e9, minirl_truncation=reading)
        g = closed_form(batch, softmax_view(batch), get_loss("minirl"), params, Aggregation())
        view = softmax_view(batch)
        ppo = closed_form(batch, view, get_loss("ppo_clip"), params, Aggregation())
        rho = torch.exp(batch.old_logp - batch.rollout_logp)  # type: ignore[operator]
        expected = torch.where(batch.mask, ppo.coefficient * rho, 0.0)
        assert rel_err(g.coefficient, expected) <= TOL_F64


# ----------------------------------------------------------------------------- gspo


def test_gspo_equals_gspo_token_with_sequence_advantages() -> None:
    batch = random_batch(4, n=6, t=5, v=11, h=5, drift=0.3)  # one advantage per sequence
    view = softmax_view(batch)
    params = LossParams(eps_low=0.05, eps_high=0.05)
    for mode in AGGREGATIONS:
        agg = Aggregation(mode, 3.0)
        a = closed_form(batch, view, get_loss("gspo"), params, agg)
        b = closed_form(batch, view, get_loss("gspo_token"), params, agg)
        assert rel_err(a.grad_weight, b.grad_weight) <= TOL_F64
        assert bool(a.terms.regions["seq_clipped"].any())  # the clip is exercised


def test_gspo_clips_whole_sequences() -> None:
    batch = random_batch(4, n=6, t=5, v=11, h=5, drift=0.3)
    g = closed_form(
        batch,
        softmax_view(batch),
        get_loss("gspo"),
        LossParams(eps_low=0.05, eps_high=0.05),
        Aggregation("seq_mean_token_mean"),
    )
    clipped = g.terms.regions["seq_clipped"]
    rows = clipped.any(-1)
    assert torch.equal(clipped, rows[:, None] & batch.mask)  # all of a sequence or none
    assert torch.all(g.coefficient[clipped] == 0)


# ----------------------------------------------------------------------------- corrections


def three_policy_batch(seed: int, drift: float = 0.8, rollout: float = 0.3) -> Batch:
    """random_batch plus μ_old (log-noise `rollout` around π_old) and π_ref."""
    batch = random_batch(seed, n=8, t=6, v=13, h=7, drift=drift)
    gen = torch.Generator().manual_seed(seed + 100)
    n, t = batch.mask.shape
    rollout_logp = batch.old_logp - rollout * torch.randn(n, t, generator=gen, dtype=F64)
    ref_logp = batch.old_logp - 0.5 * torch.randn(n, t, generator=gen, dtype=F64)
    return dataclasses.replace(batch, rollout_logp=rollout_logp, ref_logp=ref_logp)


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
    "loss_name, setting, mode", cycled([*NEW_LOSSES, "reinforce", "ppo_clip"], list(SETTINGS))
)
def test_new_settings_agree_with_autograd(loss_name: str, setting: str, mode: str) -> None:
    # Three policies and a reference, so every path of every new loss is differentiated.
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


def test_corrections_in_config_and_report() -> None:
    config = validate(
        {
            "losses": ["ppo_clip", "gspo"],
            "source": {"vocab_size": 128, "num_sequences": 8, "rollout_drift": 0.3},
            "loss": {"corrections": [{"kind": "seq_mis", "high": 1.2}, {"kind": "geo_mask"}]},
        }
    )
    report = run_compare(config)
    assert report.passed
    for r in report.losses:
        assert {"seq_mis_masked", "seq_geo_masked"} <= r.clipping.shares.keys()
        assert {"seq_mis_masked", "seq_geo_masked"} <= r.clipping.sequence_shares.keys()
    assert report.rollout is not None and report.rollout.count == report.batch.num_tokens


@pytest.mark.parametrize(
    "loss_section, message",
    [
        ({"corrections": [{"kind": "tis"}]}, "loss.corrections.0.kind"),
        ({"corrections": [{"kind": "icepop", "low": 2, "high": 1}]}, "low (2.0) > high"),
        ({"corrections": [{"kind": "icepop"}, {"kind": "icepop"}]}, "named twice"),
        ({"kl_estimator": "k4"}, "loss.kl_estimator"),
        ({"minirl_truncation": "both"}, "loss.minirl_truncation"),
        ({"tau_neg": 0}, "loss.tau_neg"),
    ],
)
def test_bad_loss_settings_are_reported_with_their_path(loss_section: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=re.escape(message)):
        validate({"loss": loss_section})


def test_synthetic_source_without_the_new_policies_is_unchanged() -> None:
    base = Config()
    batch = build_batch(base, torch.device("cpu"), torch.float32)
    assert batch.rollout_logp is None and batch.ref_logp is None
    same = validate({"source": {"rollout_drift": None, "ref_drift": None}})
    again = build_batch(same, torch.device("cpu"), torch.float32)
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.old_logp, again.old_logp)
    # a reference policy is drawn last: nothing else changes
    with_ref = build_batch(
        validate({"source": {"ref_drift": 0.5}}), torch.device("cpu"), torch.float32
    )
    assert torch.equal(with_ref.tokens, batch.tokens)
    assert torch.equal(with_ref.old_logp, batch.old_logp)
    assert with_ref.ref_logp is not None and with_ref.rollout_logp is None


def test_synthetic_rollout_policy_samples_the_tokens() -> None:
    config = validate(
        {"source": {"vocab_size": 64, "rollout_drift": 0.2, "drift": {"kind": "none"}}}
    )
    batch = build_batch(config, torch.device("cpu"), torch.float64)
    assert batch.rollout_logp is not None
    m = batch.mask
    gap = (batch.old_logp - batch.rollout_logp)[m]
    assert 0 < float(gap.abs().mean()) < 0.2  # a small, non-zero training–inference gap
    assert bool((batch.rollout_logp[m] <= 0).all())
    report = run_compare(config)
    assert report.rollout is not None and report.rollout.kl_k1 is not None


def test_literal_source_states_rollout_and_reference() -> None:
    config = validate(
        {
            "dtype": "float64",
            "losses": ["reinforce"],
            "source": {
                "kind": "literal",
                "sequences": [
                    {
                        "positions": [
                            {"probs": [0.5, 0.5], "token": 0, "old_prob": 0.4},
                            {"probs": [0.5, 0.5], "token": 1, "rollout_logp": -1.0},
                        ]
                    },
                    {"positions": [{"probs": [0.5, 0.5], "token": 0, "ref_prob": 0.25}]},
                ],
            },
        }
    )
    batch = build_batch(config, torch.device("cpu"), torch.float64)
    assert batch.rollout_logp is not None and batch.ref_logp is not None
    # stated where given, π_old(y) elsewhere
    assert float(batch.rollout_logp[0, 1]) == -1.0
    assert float(batch.rollout_logp[0, 0]) == pytest.approx(math.log(0.4))
    assert float(batch.ref_logp[1, 0]) == pytest.approx(math.log(0.25))
    assert float(batch.ref_logp[0, 0]) == pytest.approx(math.log(0.4))
    inputs = token_inputs(batch, softmax_view(batch).logp)
    assert inputs.rollout_logp is not None and inputs.ref_logp is not None
    with pytest.raises(GradlensError, match="at most one of rollout_prob and rollout_logp"):
        validate(
            {
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {
                            "positions": [
                                {
                                    "probs": [0.5, 0.5],
                                    "token": 0,
                                    "rollout_prob": 0.5,
                                    "rollout_logp": -0.7,
                                }
                            ]
                        }
                    ],
                }
            }
        )


# ----------------------------------------------------------------------------- docs §7 cases


def literal(sequences: list[list[dict]], losses: list[str], **loss: object) -> CompareReport:
    report = run_compare(literal_config(sequences, losses, **loss))
    assert report.passed, [c for c in report.checks if not c.passed]
    return report


def test_tc_gspo_two_tokens() -> None:
    # π_θ(y) = [0.6, 0.45], π_old(y) = [0.5, 0.5]: r = [1.2, 0.9], s = √1.08 = 1.039230;
    # seq_mean_token_mean over one sequence of 2 tokens: a = 1/2.
    pos = [
        {"probs": [0.6, 0.4], "token": 0, "old_prob": 0.5, "advantage": 1.0},
        {"probs": [0.45, 0.55], "token": 0, "old_prob": 0.5, "advantage": 1.0},
    ]
    agg = {"aggregation": "seq_mean_token_mean"}
    kept = literal([pos], ["gspo", "ppo_clip"], **agg)
    assert coefficients(kept, "gspo") == pytest.approx([-0.519615] * 2, abs=1e-6)
    assert coefficients(kept, "ppo_clip") == pytest.approx([-0.6, -0.45], abs=1e-12)
    clipped = literal([pos], ["gspo", "ppo_clip"], eps_high=0.03, **agg)
    assert coefficients(clipped, "gspo") == [0.0, 0.0]  # s = 1.039 > 1.03: the whole sequence
    assert coefficients(clipped, "ppo_clip") == pytest.approx([0.0, -0.45], abs=1e-12)
    assert loss(clipped, "gspo").clipping.sequence_shares == {"seq_clipped": 1.0}


def coefficients(report: CompareReport, name: str) -> list[float | None]:
    tokens = loss(report, name).tokens
    assert tokens is not None
    return [t.coefficient for t in tokens]


def test_tc_corrections_on_reinforce() -> None:
    # π_old(y) = 0.4, μ_old(y) = 0.1: ρ = 4; reinforce with A = +1, weight 1
    pos = {**position(), "old_prob": 0.4, "rollout_prob": 0.1}
    one = {"aggregation": "seq_mean_token_sum_norm", "loss_scale_factor": 1.0}
    cases = {
        "token_tis": (-2.0, "tis_truncated", 1.0),  # w = min(4, 2)
        "token_mis": (0.0, "mis_masked", 1.0),  # 4 > 3: masked
        "icepop": (-4.0, "icepop_masked", 0.0),  # 0.5 ≤ 4 ≤ 5: w = ρ = 4
    }
    for kind, (c, region, share) in cases.items():
        report = literal([[pos]], ["reinforce"], corrections=[{"kind": kind}], **one)
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
