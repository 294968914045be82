"""The policy losses beyond PPO: grpo with its KL estimators, gspo and gspo_token, cispo and
cispo_cap, sapo, minirl, and the entropy bonus composed with any of them.

Hand-computed vectors come from losses.md §12 (TC6, TC9, TC10, TC11, TC13) through the shipped
literal configs; the arithmetic is in each config's header and repeated here where it is used.
Setting for all of them: V = 5, π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0, e_0 − π =
[0.5, −0.2, −0.15, −0.1, −0.05] with norm √0.325 = 0.570088.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import literal_config, random_batch, rel_err, three_policy_batch

from gradlens.compare import run_compare
from gradlens.config import build_config, validate
from gradlens.grads import closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
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


# ----------------------------------------------------------------------------- registry


def test_every_policy_loss_is_registered_with_its_maths() -> None:
    for name in POLICY_LOSSES:
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
            "loss": {"cispo_cap": 1.5, "aggregation": "token_sum"},
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
        ("token_sum", 1.0, 1.0),
        ("token_sum_norm", 1 / 3, 1 / 3),  # L_scale = the padded length 3
        ("seq_mean_token_sum_norm", 1 / 6, 1 / 6),  # 1/(B'·L_scale) = 1/(2·3)
    ],
)
def test_tc13_weights_for_the_policy_losses(mode: str, a1: float, a2: float) -> None:
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


def position(**extra: object) -> dict:
    return {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 0, "advantage": 1.0, **extra}
