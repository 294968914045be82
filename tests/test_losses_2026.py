"""The 2025–2026 losses (docs/losses.md §2.14–§2.28) and the top-entropy token selection.

Hand-computed cases TC14–TC29 run from the literal configs shipped in ``configs/`` through the
CLI's JSON report (``gradlens compare -c ... -f json``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].

The registry-parametrized tests (tests/test_autograd_agreement.py, tests/test_losses_frontier.py)
already run every loss against autograd; here further settings drive each new loss through the
branches its defaults do not reach, and guards check that the test batch really exercises them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import F64, random_batch, rel_err
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import loss_params_from, run_compare
from gradlens.config import LossConfig, validate
from gradlens.containers import Batch, TokenInputs
from gradlens.errors import GradlensError
from gradlens.grads import Aggregation, autograd_reference, closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction
from gradlens.losses.m2po import second_moment_mask
from gradlens.sources import build_batch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
runner = CliRunner()

NEW_LOSSES = [
    "dppo_tv",
    "dppo_kl",
    "prime_rl",
    "prime_ipo",
    "m2po",
    "aspo",
    "ce_gppo",
    "gppo",
    "clip_cov",
    "kl_cov",
    "gmpo",
    "topr",
    "dro",
    "luspo",
    "vespo",
    "real",
    "fipo",
    "rollout_is",
    "cispo_rollout",
    "dft",
    "chord",
]
E0 = [0.5, -0.2, -0.15, -0.1, -0.05]  # e_0 − π
E4 = [-0.5, -0.2, -0.15, -0.1, 0.95]  # e_4 − π
# float64 literal cases: the only error is the rounding of z = log π and softmax(z) (~1e-16);
# the six-decimal hand values below are compared to 1e-6, exact ones to 1e-12.
ABS = 1e-12
SIX = 1e-6
# Closed form vs autograd in float64 (as tests/test_autograd_agreement.py): the same formula in
# two orders, a few ulps times max|g| and the number of summed terms; formula errors are O(1).
TOL_F64 = 1e-12


def scaled(c: float, direction: list[float] = E0) -> list[float]:
    return [c * x for x in direction]


def cli_report(config: str, *sets: str) -> dict[str, Any]:
    """``gradlens compare -c configs/<config> -f json --check``: the JSON, every check passed."""
    args = ["compare", "-c", str(CONFIGS / config), "-f", "json", "--check"]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True
    return data


def loss(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in report["losses"] if r["name"] == name)


def coefficients(report: dict[str, Any], name: str) -> list[float]:
    return [t["coefficient"] for t in loss(report, name)["tokens"]]


def grad(report: dict[str, Any], name: str, k: int) -> list[float]:
    return loss(report, name)["tokens"][k]["grad_logits"]


# ----------------------------------------------------------------------------- registry, config


def test_every_new_loss_is_registered_with_its_maths_and_source() -> None:
    for name in NEW_LOSSES:
        spec = get_loss(name)
        assert spec.formula and spec.coefficient and spec.zero_when and spec.paper, name
        assert re.search(r"arXiv \d{4}\.\d{5}|\w+ \w+_loss_fn|SkyRL", spec.paper), name
        assert spec.coupling in ("token", "sequence", "group", "batch"), name
        module = __import__(spec.fn.__module__, fromlist=["_"])
        doc = module.__doc__ or ""
        assert "Zero when" in doc and "arXiv" in doc, name  # the maths is beside the code


def test_loss_config_defaults_are_the_loss_params_defaults() -> None:
    config = LossConfig()
    params = LossParams()
    for field in dataclasses.fields(LossParams):
        if field.name in ("aggregation", "loss_scale_factor"):
            continue
        expected = getattr(params, field.name)
        got = getattr(config, field.name)
        if field.name == "corrections":
            got = tuple(got)
        assert got == expected, field.name
    assert loss_params_from(config) == params


def test_every_new_setting_reaches_the_losses() -> None:
    # A value different from its default for every field added with the new losses: each must
    # arrive in LossParams under the same name (the mapping is a plain keyword list).
    new_fields = [f.name for f in dataclasses.fields(LossParams)][
        [f.name for f in dataclasses.fields(LossParams)].index("dppo_tv_low") :
    ]
    changed: dict[str, Any] = {}
    for name in new_fields:
        default = getattr(LossParams(), name)
        if isinstance(default, bool):
            changed[name] = not default
        elif isinstance(default, int):
            changed[name] = default + 7
        elif default is None or isinstance(default, float):
            changed[name] = {"aspo_entropy_quantile": 0.5, "top_entropy_quantile": 0.25}.get(
                name, 0.625
            )
    changed["clip_cov_lb"], changed["clip_cov_ub"] = -2.0, 2.0
    changed["aspo_clip_c_neg"], changed["aspo_clip_c_pos"] = 1.5, 2.5
    params = loss_params_from(LossConfig(**changed))
    for name, value in changed.items():
        assert getattr(params, name) == value, name


@pytest.mark.parametrize(
    "section, message",
    [
        ({"top_entropy_quantile": 0}, "loss.top_entropy_quantile"),
        ({"top_entropy_quantile": 1.5}, "loss.top_entropy_quantile"),
        ({"dppo_cap": 0}, "loss.dppo_cap"),
        ({"aspo_clip_c_neg": 1.0}, "loss.aspo_clip_c_neg"),
        ({"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, "clip_cov_lb (5.0) must be below"),
        ({"real_tau": 0}, "loss.real_tau"),
        ({"dro_beta": -1}, "loss.dro_beta"),
        ({"selection_seed": -1}, "loss.selection_seed"),
    ],
)
def test_bad_new_settings_name_their_field(section: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=re.escape(message)):
        validate({"loss": section})


# ----------------------------------------------------------------------------- TC14 DPPO


def test_tc14_dppo_binary_tv_and_kl_masks() -> None:
    report = cli_report("literal_tc14_dppo.yaml")
    # seq 0: Δπ = +0.1, D = 0.020136: kept, g = −min(1.25, 3) = −1.25
    # seq 1: Δπ = +0.2 > 0.15, D = 0.082283 > 0.05 with π > π_old: masked (upper)
    # seq 2: Δπ = −0.2 < −0.15, D = 0.082283 with π < π_old: masked (lower)
    # seq 3: A < 0, π rose: kept, weight min(4, C = 3) = 3, g = +3 (ppo_clip: +4)
    for name in ("dppo_tv", "dppo_kl"):
        assert coefficients(report, name) == pytest.approx([-1.25, 0.0, 0.0, 3.0], abs=ABS)
        assert grad(report, name, 0) == pytest.approx([-0.625, 0.25, 0.1875, 0.125, 0.0625])
        assert grad(report, name, 3) == pytest.approx([1.5, -0.6, -0.45, -0.3, -0.15], abs=ABS)
        clip = loss(report, name)["clipping"]
        assert (clip["upper"], clip["lower"], clip["region"]) == (0.25, 0.25, 0.5)
        assert clip["shares"]["ratio_capped"] == 0.25  # verl's pg_clipfrac_lower for DPPO
    assert coefficients(report, "ppo_clip") == pytest.approx([-1.25, 0.0, 0.0, 4.0], abs=ABS)


def test_tc14_dppo_cap_none_is_the_untruncated_ratio() -> None:
    # verl's example script sets clip_ratio_c = 10000: seq 3 then keeps r = 4
    report = cli_report("literal_tc14_dppo.yaml", "loss.dppo_cap=null")
    assert coefficients(report, "dppo_tv") == pytest.approx([-1.25, 0.0, 0.0, 4.0], abs=ABS)
    assert "ratio_capped" not in loss(report, "dppo_tv")["clipping"]["shares"]


def test_tc14_the_masks_are_on_the_probability_not_the_ratio() -> None:
    # Same ratio r = 1.25 at a low probability: π_θ(y) = 0.05 (y = 4), π_old = 0.04, Δπ = 0.01:
    # DPPO keeps the token at any δ ≥ 0.01; PPO-clip with eps_high = 0.2 clips it (1.25 > 1.2).
    report = run_compare(
        validate(
            {
                "dtype": "float64",
                "losses": ["dppo_tv", "ppo_clip"],
                "loss": {"eps_high": 0.2, "aggregation": "seq_mean_token_sum_norm"},
                "diagnostics": {"token_details": "on"},
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {
                            "positions": [
                                {
                                    "probs": [0.5, 0.2, 0.15, 0.1, 0.05],
                                    "token": 4,
                                    "old_prob": 0.04,
                                    "advantage": 1.0,
                                }
                            ]
                        }
                    ],
                },
            }
        )
    )
    by = {r.name: r for r in report.losses}
    assert by["dppo_tv"].tokens is not None and by["ppo_clip"].tokens is not None
    assert by["dppo_tv"].tokens[0].coefficient == pytest.approx(-1.25, abs=ABS)
    assert by["ppo_clip"].tokens[0].coefficient == 0.0


# ----------------------------------------------------------------------------- TC15 prime-rl


def test_tc15_prime_rl_and_ipo() -> None:
    report = cli_report("literal_tc15_prime.yaml")
    # g = −A·r_μ·M + 2τ·ln r_μ, τ = 0.1:
    #   seq 0: −1.111111 + 0.2·0.105361 = −1.090039 (both keep it)
    #   seq 1: Δπ = 0.25 > 0.2 and > 0.1: masked by both, the penalty's 0.2·ln 2 = 0.138629 stays
    #   seq 2: A < 0 with Δπ = +0.15: prime_rl keeps it (+1.428571 + 0.071335 = 1.499906);
    #          IPO masks it (|0.15| > 0.1): 0.071335
    assert coefficients(report, "prime_rl") == pytest.approx(
        [-1.090039, 0.138629, 1.499906], abs=SIX
    )
    assert coefficients(report, "prime_ipo") == pytest.approx(
        [-1.090039, 0.138629, 0.071335], abs=SIX
    )
    for name in ("prime_rl", "prime_ipo"):
        assert grad(report, name, 1) == pytest.approx(
            [0.069315, -0.027726, -0.020794, -0.013863, -0.006931], abs=SIX
        )
    # loss = (−1.111111 + 0.001110) + 0.048045 + (1.428571 + 0.012722) = 0.379337
    assert loss(report, "prime_rl")["loss"] == pytest.approx(0.379337, abs=SIX)
    assert loss(report, "prime_rl")["clipping"]["shares"]["clip_upper"] == pytest.approx(1 / 3)
    assert loss(report, "prime_ipo")["clipping"]["shares"]["tv_masked"] == pytest.approx(2 / 3)


def test_prime_rl_ratio_carries_its_gradient() -> None:
    # The ratio is not detached: the closed form −A·r_μ is also what autograd gives through
    # −A·exp(ℓ − ℓ_μ) (a detached ratio would be −A·r_μ too, but its per-token loss would be
    # −A·r_μ·ℓ; the loss value tells them apart): seq 0 contributes −A·r_μ = −1.111111.
    report = cli_report("literal_tc15_prime.yaml", "loss.prime_kl_tau=0")
    assert loss(report, "prime_rl")["loss"] == pytest.approx(-1.111111 + 1.428571, abs=SIX)


# ----------------------------------------------------------------------------- TC16 M2PO


def test_tc16_m2po_masks_the_largest_second_moment() -> None:
    report = cli_report("literal_tc16_m2po.yaml")
    # M2 = [0.25, 0.01, 0]: the rest's mean 0.086667 ≥ 0.04, then 0.005 < 0.04: one masked
    assert coefficients(report, "m2po") == pytest.approx([0.0, 1.0, -1.0], abs=ABS)
    assert coefficients(report, "ppo_clip") == pytest.approx([-1.0, 1.0, -1.0], abs=ABS)
    assert loss(report, "m2po")["clipping"]["shares"]["m2_masked"] == pytest.approx(1 / 3)
    # τ = 0.1: 0.086667 < 0.1 at once, nothing masked; τ = 0.004: two masked (0 < 0.004)
    none = cli_report("literal_tc16_m2po.yaml", "loss.m2po_threshold=0.1")
    assert coefficients(none, "m2po") == pytest.approx([-1.0, 1.0, -1.0], abs=ABS)
    two = cli_report("literal_tc16_m2po.yaml", "loss.m2po_threshold=0.004")
    assert coefficients(two, "m2po") == pytest.approx([0.0, 0.0, -1.0], abs=ABS)


def test_m2po_never_masks_every_token() -> None:
    # AReaL: when no suffix mean falls below τ, all but one token (the smallest M2) are masked
    m2 = torch.tensor([[4.0, 1.0, 9.0]], dtype=F64)
    mask = torch.ones_like(m2, dtype=torch.bool)
    assert second_moment_mask(m2, mask, 0.5).tolist() == [[True, False, True]]
    # ties: the earlier token is masked first (stable order)
    tied = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    assert second_moment_mask(tied, mask, 0.6).tolist() == [[True, False, False]]


# ----------------------------------------------------------------------------- TC17 ASPO


def test_tc17_aspo() -> None:
    report = cli_report("literal_tc17_aspo.yaml")
    # seq 0 (A = +1, r = 1.315789): low-entropy token clipped at 1.2, the π token (width 0.4)
    #   gets the flipped weight −A/r = −0.76; seq 1 (A = −1, r = 0.714286): low clipped at 0.8,
    #   π token −A·r = +0.714286; seq 2: −1/0.625 = −1.6; seq 3 (y = 4, r = 0.25 < 1/3): −c⁺ = −3;
    #   seq 4 (A = −1, r = 4 > c⁻): +3
    assert coefficients(report, "aspo") == pytest.approx(
        [0.0, -0.76, 0.0, 0.714286, -1.6, -3.0, 3.0], abs=SIX
    )
    assert grad(report, "aspo", 1) == pytest.approx([-0.38, 0.152, 0.114, 0.076, 0.038], abs=SIX)
    assert grad(report, "aspo", 5) == pytest.approx([1.5, 0.6, 0.45, 0.3, -2.85], abs=SIX)
    assert grad(report, "aspo", 6) == pytest.approx([1.5, -0.6, -0.45, -0.3, -0.15], abs=SIX)
    shares = loss(report, "aspo")["clipping"]["shares"]
    assert shares["high_entropy"] == pytest.approx(2 / 7)  # the π tokens of seq 0 and seq 1
    for name in ("clip_upper", "clip_lower", "clip_dual", "clip_dual_pos"):
        assert shares[name] == pytest.approx(1 / 7), name


def test_aspo_without_entropies_says_what_is_missing() -> None:
    batch = random_batch(1)
    inputs = TokenInputs(
        logp=softmax_view(batch).logp,
        old_logp=batch.old_logp,
        advantages=batch.advantages,
        mask=batch.mask,
    )
    with pytest.raises(GradlensError, match="aspo's clip widths depend on each token's entropy"):
        get_loss("aspo").fn(inputs, LossParams())


# ----------------------------------------------------------------------------- TC18 GPPO


def test_tc18_gradient_preserving_clip() -> None:
    report = cli_report("literal_tc18_gppo.yaml")
    # seq 0: A>0, r = 2 > 1.28: −β₂·1.28 = −1.28 (ppo_clip 0); seq 1: A<0, r < 0.8: −A·β₁·0.8
    # = 0.2 (gppo: 0.8); seq 2: r = 4 > c = 3: dual clip, 0; seq 3: inside, −1.25
    assert coefficients(report, "ce_gppo") == pytest.approx([-1.28, 0.2, 0.0, -1.25], abs=ABS)
    assert coefficients(report, "gppo") == pytest.approx([-1.28, 0.8, 0.0, -1.25], abs=ABS)
    assert coefficients(report, "ppo_clip") == pytest.approx([0.0, 0.0, 0.0, -1.25], abs=ABS)
    assert grad(report, "ce_gppo", 0) == pytest.approx([-0.64, 0.256, 0.192, 0.128, 0.064])
    assert grad(report, "ce_gppo", 1) == pytest.approx([0.1, -0.04, -0.03, -0.02, -0.01])
    clip = loss(report, "ce_gppo")["clipping"]
    assert (clip["region"], clip["dual"]) == (0.5, 0.25)
    # without the dual clip seq 2 keeps −A·r = 4
    no_dual = cli_report("literal_tc18_gppo.yaml", "loss.dual_clip=null")
    assert coefficients(no_dual, "ce_gppo")[2] == pytest.approx(4.0, abs=ABS)


# ----------------------------------------------------------------------------- TC19 Cov


def test_tc19_clip_cov_and_kl_cov() -> None:
    report = cli_report("literal_tc19_covariance.yaml")
    # cov = [1.609438, 2.995732, −0.223144, −1.609438]; t1 is PPO-clipped (A<0, r = 0.5)
    assert coefficients(report, "ppo_clip") == pytest.approx([-2.0, 0.0, -2.0, 2.0], abs=ABS)
    assert coefficients(report, "clip_cov") == pytest.approx([0.0, 0.0, -2.0, 2.0], abs=ABS)
    # kl_cov: no clip; t1 (largest cov) gets k·sign(ln 0.5) = −0.5 on top of −A·r = 1
    assert coefficients(report, "kl_cov") == pytest.approx([-2.0, 0.5, -2.0, 2.0], abs=ABS)
    assert grad(report, "kl_cov", 1) == pytest.approx(scaled(0.5, E4), abs=ABS)
    assert loss(report, "kl_cov")["loss"] == pytest.approx(-0.653426, abs=SIX)
    for name in ("clip_cov", "kl_cov"):
        assert loss(report, name)["clipping"]["shares"]["cov_selected"] == 0.25


def test_clip_cov_random_selection_is_seeded_and_reported() -> None:
    # Four candidates on a batch built for it, one slot: which one depends on the seed only.
    batch = dataclasses.replace(random_batch(4, n=8, t=6, v=13, h=7, drift=0.05))
    params = LossParams(clip_cov_ratio=0.05, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    chosen = []
    for seed in range(8):
        p = dataclasses.replace(params, selection_seed=seed)
        g = closed_form(batch, softmax_view(batch), get_loss("clip_cov"), p, Aggregation())
        again = closed_form(batch, softmax_view(batch), get_loss("clip_cov"), p, Aggregation())
        selected = g.terms.regions["cov_selected"]
        assert int(selected.sum()) == max(int(0.05 * batch.num_tokens), 1)
        assert torch.equal(selected, again.terms.regions["cov_selected"])  # reproducible
        assert torch.all(g.coefficient[selected] == 0)
        chosen.append(tuple(torch.nonzero(selected).flatten().tolist()))
    assert len(set(chosen)) > 1  # the seed does choose


# ----------------------------------------------------------------------------- TC20 GMPO


def test_tc20_gmpo_clips_tokens_inside_the_geometric_mean() -> None:
    report = cli_report("literal_tc20_gmpo.yaml")
    # δ₀ = ln 2 > 0.4 → 0.4; ρ = exp((0.4 − 0.105361)/2) = 1.158724; a = 1/2
    assert coefficients(report, "gmpo") == pytest.approx([0.0, -0.579362], abs=SIX)
    assert grad(report, "gmpo", 1) == pytest.approx([-0.318649, 0.318649], abs=SIX)
    assert loss(report, "gmpo")["loss"] == pytest.approx(-1.158724, abs=SIX)
    assert loss(report, "gmpo")["clipping"]["upper"] == 0.5
    # with π_old(y) = 0.5 on token 0 nothing is clipped: ρ = √1.08, c = −0.519615 on both
    config = validate(json.loads(json.dumps(cli_report("literal_tc20_gmpo.yaml")["config"])))
    data = config.model_dump(mode="json")
    data["source"]["sequences"][0]["positions"][0]["old_prob"] = 0.5
    unclipped = run_compare(validate(data))
    assert [t.coefficient for t in unclipped.losses[0].tokens or []] == pytest.approx(
        [-0.519615, -0.519615], abs=SIX
    )


# ----------------------------------------------------------------------------- TC21–TC22


def test_tc21_topr() -> None:
    report = cli_report("literal_tc21_topr.yaml")
    # A>0: −A (no IS); A≤0: −A·min(r, 1): r = 2 → 1, r = 0.625 → 0.625
    assert coefficients(report, "topr") == pytest.approx([-1.0, 1.0, 0.625], abs=ABS)
    assert grad(report, "topr", 2) == pytest.approx(scaled(0.625), abs=ABS)
    assert loss(report, "topr")["loss"] == pytest.approx(0.625 * math.log(0.5), abs=ABS)
    assert loss(report, "topr")["clipping"]["shares"]["ratio_truncated"] == pytest.approx(1 / 3)


def test_tc22_dro() -> None:
    report = cli_report("literal_tc22_dro.yaml")
    # g = −A + 0.1·ln(0.5/π_old): −1 + 0.069315, 0 + 0.069315, −1
    assert coefficients(report, "dro") == pytest.approx([-0.930685, 0.069315, -1.0], abs=SIX)
    assert grad(report, "dro", 0) == pytest.approx(
        [-0.465343, 0.186137, 0.139603, 0.093069, 0.046534], abs=SIX
    )
    assert loss(report, "dro")["loss"] == pytest.approx(1.434340, abs=SIX)


# ----------------------------------------------------------------------------- TC23 LUSPO


def test_tc23_luspo_is_length_unbiased() -> None:
    report = cli_report("literal_tc23_luspo.yaml")
    # s₁ = 1.25^(1/3) = 1.077217; gspo c = a·(−s) = [−1/2, −1.077217/6 ×3];
    # luspo c = a·(−|y|·s) = [−1/2, −3·1.077217/6 = −0.538609 ×3]
    assert coefficients(report, "gspo") == pytest.approx([-0.5] + [-0.179536] * 3, abs=SIX)
    assert coefficients(report, "luspo") == pytest.approx([-0.5] + [-0.538609] * 3, abs=SIX)
    assert grad(report, "luspo", 1) == pytest.approx(
        [-0.269304, 0.107722, 0.080791, 0.053861, 0.026930], abs=SIX
    )


# ----------------------------------------------------------------------------- TC24 VESPO


def test_tc24_vespo_sequence_product_weight() -> None:
    report = cli_report("literal_tc24_vespo.yaml")
    # φ(1) = 1, φ₊(2) = 4e^{−3}, φ₋(2) = 8e^{−2}, φ₊(2/3) = (4/9)e, φ(2·0.5) = 1, ρ folded: 4e^{−3}
    phi_pos, phi_neg, top = 4 * math.exp(-3), 8 * math.exp(-2), 4 / 9 * math.e
    expected = [-1.0, -phi_pos, phi_neg, -top, -1.0, -1.0, -phi_pos]
    assert coefficients(report, "vespo") == pytest.approx(expected, abs=ABS)
    assert [round(abs(c), 6) for c in expected[1:4]] == [0.199148, 1.082682, 1.208125]
    assert grad(report, "vespo", 2) == pytest.approx(
        [0.541341, -0.216536, -0.162402, -0.108268, -0.054134], abs=SIX
    )
    assert loss(report, "vespo")["metrics"]["vespo_phi"] == pytest.approx(5.689103, abs=1e-5)


# ----------------------------------------------------------------------------- TC25 REAL


def test_tc25_real_group_classification() -> None:
    report = cli_report("literal_tc25_real.yaml")
    # c(seq 0) = (1/2)·(−2·0.25/1.25) = −0.2; c(seq 1) = (1/4)·(2·1/2) = 0.25 per token; group 1
    # has no O⁻ member: skipped
    assert coefficients(report, "real") == pytest.approx([-0.2, 0.25, 0.25, 0.0], abs=ABS)
    assert grad(report, "real", 0) == pytest.approx(scaled(-0.2), abs=ABS)
    assert grad(report, "real", 1) == pytest.approx(scaled(0.25), abs=ABS)
    r = loss(report, "real")
    assert r["loss"] == pytest.approx((math.log(2) + math.log(1.25)) / 2, abs=ABS)  # 0.458145
    assert r["clipping"]["sequence_shares"]["seq_group_skipped"] == pytest.approx(1 / 3)
    # REAL normalises itself: another aggregation changes nothing
    other = cli_report("literal_tc25_real.yaml", "loss.aggregation=seq_mean_token_sum")
    assert coefficients(other, "real") == pytest.approx([-0.2, 0.25, 0.25, 0.0], abs=ABS)


def test_real_needs_groups_and_says_which_settings_give_them() -> None:
    config = validate(
        {
            "losses": ["real"],
            "dtype": "float64",
            "source": {
                "kind": "literal",
                "sequences": [{"positions": [{"probs": [0.5, 0.5], "token": 0}]}],
            },
        }
    )
    with pytest.raises(GradlensError, match=r"real is group-coupled.*group_size"):
        run_compare(config)
    with pytest.raises(GradlensError, match="state group on every sequence or on none"):
        validate(
            {
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {"group": 0, "positions": [{"probs": [0.5, 0.5], "token": 0}]},
                        {"positions": [{"probs": [0.5, 0.5], "token": 0}]},
                    ],
                }
            }
        )


def test_synthetic_batches_carry_their_prompt_groups() -> None:
    batch = build_batch(
        validate({"source": {"num_sequences": 8, "group_size": 4, "vocab_size": 64}}),
        torch.device("cpu"),
        torch.float32,
    )
    assert batch.groups is not None and batch.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# ----------------------------------------------------------------------------- TC26 FIPO


def test_tc26_fipo_future_kl_weight() -> None:
    report = cli_report("literal_tc26_fipo.yaml")
    gamma = 2 ** (-1 / 32)
    d = math.log(0.5 / 0.45)
    # seq 0: f = [e^{γ·d}, e^{d}, 1] = [1.108605, 1.111111, 1], g = −f·r, r = [1, 1/0.9, 1];
    # seq 1: e^F < 1 → f = 1; seq 2: safety (A<0, r = 5 > 4): f = 1, g = 5
    expected = [-math.exp(gamma * d), -math.exp(d) * 0.5 / 0.45, -1.0, -1.0, -0.5 / 0.6, 5.0]
    assert coefficients(report, "fipo") == pytest.approx(expected, abs=ABS)
    assert [round(c, 6) for c in expected[:2]] == [-1.108605, -1.234568]
    assert grad(report, "fipo", 1) == pytest.approx(
        [-0.617284, 0.246914, 0.185185, 0.123457, 0.061728], abs=SIX
    )
    assert coefficients(report, "ppo_clip") == pytest.approx(
        [-1.0, -0.5 / 0.45, -1.0, -1.0, -0.5 / 0.6, 5.0], abs=ABS
    )
    # without the safety clamp the A<0 token's weight is clip(5, 1, 1.2) = 1.2: g = 6
    off = cli_report("literal_tc26_fipo.yaml", "loss.fipo_safety_threshold=null")
    assert coefficients(off, "fipo")[5] == pytest.approx(6.0, abs=ABS)


# ----------------------------------------------------------------------------- TC27 rollout


def test_tc27_weights_anchored_on_the_rollout() -> None:
    report = cli_report("literal_tc27_rollout_anchored.yaml")
    # r_μ = [1.111111, 2, 0.714286]
    assert coefficients(report, "rollout_is") == pytest.approx([-0.5 / 0.45, 0.0, 0.0], abs=ABS)
    assert coefficients(report, "cispo_rollout") == pytest.approx(
        [-0.5 / 0.45, -1.28, 0.5 / 0.7], abs=ABS
    )
    assert coefficients(report, "cispo") == pytest.approx([-1.0, -1.0, 1.0], abs=ABS)
    assert grad(report, "cispo_rollout", 1) == pytest.approx(scaled(-1.28), abs=ABS)
    assert loss(report, "rollout_is")["clipping"]["shares"]["is_masked"] == pytest.approx(2 / 3)
    assert loss(report, "cispo_rollout")["clipping"]["shares"]["weight_clipped"] == (
        pytest.approx(1 / 3)
    )


def test_rollout_anchored_losses_warn_about_stacked_corrections() -> None:
    report = cli_report(
        "literal_tc27_rollout_anchored.yaml", "loss.corrections=[{kind: token_tis}]"
    )
    for name in ("rollout_is", "cispo_rollout"):
        assert any(
            "counts the training–inference ratio twice" in f for f in loss(report, name)["findings"]
        )
    assert not any("twice" in f for f in loss(report, "cispo")["findings"])


# ----------------------------------------------------------------------------- TC28 SFT


def test_tc28_sft_variants() -> None:
    report = cli_report("literal_tc28_sft_variants.yaml")
    assert coefficients(report, "sft") == pytest.approx([-1.0, -1.0], abs=ABS)
    assert coefficients(report, "dft") == pytest.approx([-0.5, -0.05], abs=ABS)
    assert coefficients(report, "chord") == pytest.approx([-0.25, -0.0475], abs=ABS)
    assert grad(report, "dft", 0) == pytest.approx([-0.25, 0.1, 0.075, 0.05, 0.025], abs=ABS)
    assert grad(report, "chord", 0) == pytest.approx([-0.125, 0.05, 0.0375, 0.025, 0.0125], abs=ABS)
    assert grad(report, "dft", 1) == pytest.approx([0.025, 0.01, 0.0075, 0.005, -0.0475])
    assert grad(report, "chord", 1) == pytest.approx(
        [0.02375, 0.0095, 0.007125, 0.00475, -0.045125], abs=ABS
    )


# ----------------------------------------------------------------------------- TC29 selection


def test_tc29_top_entropy_selection_masks_policy_and_bonus() -> None:
    report = cli_report("literal_tc29_top_entropy.yaml")
    r = loss(report, "reinforce")
    assert coefficients(report, "reinforce") == pytest.approx([0.0, -1.0], abs=ABS)
    assert grad(report, "reinforce", 0) == pytest.approx([0.0] * 5, abs=ABS)  # no bonus either
    assert grad(report, "reinforce", 1) == pytest.approx(
        [-0.180036, 0.144727, 0.065393, 0.003049, -0.033133], abs=SIX
    )
    assert r["loss"] == pytest.approx(-math.log(0.5) - 1.333074, abs=SIX)  # −0.639927
    assert r["clipping"]["shares"]["entropy_masked"] == 0.5
    # ρ = 1 (off): both tokens train, and both get the bonus
    off = cli_report("literal_tc29_top_entropy.yaml", "loss.top_entropy_quantile=1")
    assert coefficients(off, "reinforce") == pytest.approx([-1.0, -1.0], abs=ABS)
    assert "entropy_masked" not in loss(off, "reinforce")["clipping"]["shares"]


# ----------------------------------------------------------------------------- autograd


def policy_batch(seed: int, drift: float = 0.8, rollout: float = 0.3) -> Batch:
    """random_batch (prompt groups of two) plus μ_old and π_ref around π_old."""
    batch = random_batch(seed, n=8, t=6, v=13, h=7, drift=drift)
    gen = torch.Generator().manual_seed(seed + 100)
    n, t = batch.mask.shape
    rollout_logp = batch.old_logp - rollout * torch.randn(n, t, generator=gen, dtype=F64)
    ref_logp = batch.old_logp - 0.5 * torch.randn(n, t, generator=gen, dtype=F64)
    return dataclasses.replace(batch, rollout_logp=rollout_logp, ref_logp=ref_logp)


SETTINGS = {
    # the batch's π_θ(y) are small (V = 13, random tokens): DPPO's δ must be small to bind
    "dppo_tight": LossParams(
        dppo_cap=1.5, dppo_tv_low=0.05, dppo_tv_high=0.05, dppo_kl_low=0.01, dppo_kl_high=0.01
    ),
    "dppo_no_cap": LossParams(dppo_cap=None),
    "prime": LossParams(prime_kl_tau=0.5, prime_mask_low=0.05, prime_mask_high=0.05),
    "ipo": LossParams(ipo_threshold=0.02, prime_kl_tau=0.3),
    "m2po": LossParams(m2po_threshold=0.01, dual_clip=2.0),
    "aspo": LossParams(aspo_entropy_quantile=0.5, aspo_clip_c_neg=1.5, aspo_clip_c_pos=1.5),
    "gppo": LossParams(gppo_beta1=0.5, gppo_beta2=0.75, dual_clip=2.0),
    "cov": LossParams(
        clip_cov_ratio=0.5,
        clip_cov_lb=-1.0,
        clip_cov_ub=1.0,
        selection_seed=3,
        kl_cov_ratio=0.3,
        kl_cov_coef=1.0,
    ),
    "gmpo": LossParams(gmpo_eps_low=0.1, gmpo_eps_high=0.1),
    "weights": LossParams(topr_pos_weight=0.5, topr_neg_weight=2.0, dro_beta=1.0, real_tau=2.0),
    "vespo": LossParams(vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=0.5),
    "fipo": LossParams(
        fipo_clip_range=0.5,
        fipo_clip_high_only=False,
        fipo_safety_threshold=1.5,
        fipo_decay_rate=2.0,
        dual_clip=2.5,
    ),
    "fipo_off": LossParams(fipo_clip_range=None, fipo_safety_threshold=None),
    "bands": LossParams(eps_low=0.05, eps_high=0.05, cispo_eps_low=0.1, cispo_eps_high=0.1),
    "top_entropy": LossParams(top_entropy_quantile=0.3, entropy_coef=0.05),
    "top_entropy_corrected": LossParams(
        top_entropy_quantile=0.6, corrections=(Correction("token_tis", None, 1.2),)
    ),
}


def cycled(names: list[str], others: list[str]) -> list[tuple[str, str, str]]:
    """(name, other, aggregation) for every pair, the aggregation cycling so that each name and
    each other meets every aggregation."""
    modes = list(AGGREGATIONS)
    return [
        (a, b, modes[(i + j) % len(modes)])
        for i, a in enumerate(names)
        for j, b in enumerate(others)
    ]


def check_agreement(batch: Batch, name: str, params: LossParams, agg: Aggregation) -> None:
    spec = get_loss(name)
    closed = closed_form(batch, softmax_view(batch), spec, params, agg)
    ref = autograd_reference(batch, spec, params, agg)
    m = batch.mask
    assert float(closed.grad_weight.abs().max()) > 0
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)
    assert torch.all(closed.coefficient[~m] == 0)
    scale = float(closed.grad_logits.abs().max())  # zero-sum, entropy bonus included
    assert float(closed.grad_logits.sum(-1).abs().max()) <= 1e-13 * max(scale, 1.0)


@pytest.mark.parametrize("name, setting, mode", cycled(NEW_LOSSES, list(SETTINGS)))
def test_new_losses_agree_with_autograd_in_every_setting(name: str, setting: str, mode: str):
    check_agreement(policy_batch(5), name, SETTINGS[setting], Aggregation(mode, 5.0))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("name", loss_names())
def test_top_entropy_selection_agrees_with_autograd_for_every_loss(name: str, mode: str):
    check_agreement(
        policy_batch(6),
        name,
        LossParams(top_entropy_quantile=0.4, entropy_coef=0.1),
        Aggregation(mode, 5.0),
    )


# Each rule must fire on some, but not all, valid tokens of the batch the settings above are
# tested on, or the agreement tests would not exercise it.
EXERCISED = [
    ("dppo_tv", SETTINGS["dppo_tight"], ("clip_upper", "clip_lower", "ratio_capped")),
    ("dppo_kl", SETTINGS["dppo_tight"], ("clip_upper", "clip_lower", "ratio_capped")),
    ("prime_rl", SETTINGS["prime"], ("clip_upper", "clip_lower")),
    ("prime_ipo", SETTINGS["ipo"], ("tv_masked",)),
    ("m2po", SETTINGS["m2po"], ("m2_masked", "clip_dual")),
    ("aspo", LossParams(), ("clip_upper", "clip_lower", "clip_dual", "high_entropy")),
    ("aspo", SETTINGS["aspo"], ("clip_dual_pos", "high_entropy")),
    ("ce_gppo", SETTINGS["gppo"], ("clip_upper", "clip_lower", "clip_dual")),
    ("clip_cov", SETTINGS["cov"], ("cov_selected",)),
    ("kl_cov", SETTINGS["cov"], ("cov_selected",)),
    ("gmpo", SETTINGS["gmpo"], ("clip_upper", "clip_lower")),
    ("topr", LossParams(), ("ratio_truncated",)),
    ("luspo", SETTINGS["bands"], ("seq_clipped",)),
    ("real", LossParams(), ("seq_group_skipped",)),
    ("fipo", SETTINGS["fipo"], ("fipo_safety", "clip_dual")),
    ("rollout_is", SETTINGS["bands"], ("is_masked",)),
    ("cispo_rollout", SETTINGS["bands"], ("weight_clipped",)),
    ("reinforce", SETTINGS["top_entropy"], ("entropy_masked",)),
]


@pytest.mark.parametrize(
    "name, params, regions", EXERCISED, ids=[f"{n}-{'-'.join(r)}" for n, _, r in EXERCISED]
)
def test_the_tested_batch_exercises_every_rule(name: str, params: LossParams, regions) -> None:
    batch = policy_batch(5)
    g = closed_form(batch, softmax_view(batch), get_loss(name), params, Aggregation())
    for region in regions:
        hit = g.terms.regions[region] & batch.mask
        assert 0 < int(hit.sum()) < batch.num_tokens, region


def test_fipo_weight_is_between_its_clip_bounds() -> None:
    batch = policy_batch(5)
    view = softmax_view(batch)
    for params, low, high in (
        (LossParams(), 1.0, 1.2),
        (SETTINGS["fipo"], 0.5, 1.5),
    ):
        g = closed_form(batch, view, get_loss("fipo"), params, Aggregation())
        base = closed_form(batch, view, get_loss("ppo_clip"), params, Aggregation())
        w = g.terms.token_metrics["fipo_weight"][batch.mask]
        assert float(w.min()) >= low - 1e-15 and float(w.max()) <= high + 1e-15
        assert float(w.min()) < float(w.max())  # not constant: the future KL varies
        ratio = g.coefficient[batch.mask] / torch.where(
            base.coefficient[batch.mask] == 0, 1.0, base.coefficient[batch.mask]
        )
        kept = base.coefficient[batch.mask] != 0
        assert rel_err(ratio[kept], w[kept]) <= TOL_F64  # g = f·g_ppo_clip


def test_a_batch_file_has_prompt_groups_only_when_group_size_is_set(tmp_path: Path) -> None:
    path = tmp_path / "batch.safetensors"
    small = ["--set", "source.vocab_size=64", "--set", "source.num_sequences=8"]
    assert runner.invoke(app, ["dump", "-o", str(path), *small]).exit_code == 0
    read = ["compare", "--losses", "real", "--set", f"source.path={path}", "-f", "json"]
    unset = runner.invoke(app, read)
    assert unset.exit_code == 2 and "source.group_size" in unset.output
    stated = runner.invoke(app, [*read, "--set", "source.group_size=4"])
    assert stated.exit_code == 0, stated.output
    r = json.loads(stated.stdout)["losses"][0]
    # two groups of four with mixed rewards (seed 0: Â = [0.87, −0.87, −0.87, 0.87] and
    # [−0.5, −0.5, 1.5, −0.5]): both have an O⁺ and an O⁻ member, none is skipped
    assert r["clipping"]["sequence_shares"]["seq_group_skipped"] == 0.0
    # group_size 1 stated: every sequence is a group of one, with one side only: all skipped
    ones = runner.invoke(app, [*read, "--set", "source.group_size=1"])
    r1 = json.loads(ones.stdout)["losses"][0]
    assert r1["clipping"]["sequence_shares"]["seq_group_skipped"] == 1.0
    bad = runner.invoke(app, [*read, "--set", "source.group_size=3"])
    assert bad.exit_code == 2 and "not a multiple of 3" in bad.output


def test_every_loss_survives_a_batch_without_signal() -> None:
    # A = 0 everywhere, on-policy: most coefficients are 0 and real skips every group; the loss
    # must still be a differentiable function of ℓ (autograd's reference needs a graph) and every
    # check must pass. The rollout policy is stated so that the μ-anchored losses read it.
    position = {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 1, "rollout_prob": 0.25}
    config = validate(
        {
            "dtype": "float64",
            "losses": loss_names(),
            "loss": {"top_entropy_quantile": 0.5, "entropy_coef": 0.01},
            "source": {
                "kind": "literal",
                "sequences": [
                    {"group": 0, "positions": [position, {**position, "token": 0}]},
                    {"group": 0, "positions": [{**position, "token": 3}]},
                ],
            },
        }
    )
    report = run_compare(config)
    assert report.passed, [c for c in report.checks if not c.passed]
    by = {r.name: r for r in report.losses}
    assert by["real"].coefficient_abs_max == 0.0 and by["reinforce"].coefficient_abs_max == 0.0
