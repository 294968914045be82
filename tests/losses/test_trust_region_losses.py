"""The trust-region losses: DPPO's and prime-rl's masks on the probability (``dppo_tv``,
``dppo_kl``, ``prime_rl``, ``prime_ipo``; docs/losses.md §2.14), M2PO's second-moment mask
(§2.15), ASPO's flipped weights and entropy-dependent widths (§2.16), the gradient-preserving
clips (``ce_gppo``, ``gppo``; §2.17) and GMPO's log-space clip inside the geometric mean (§2.19).

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    ABS,
    F64,
    SIX,
    cli_report,
    coefficients,
    loss_json,
    random_batch,
    token_grad,
)

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.containers import TokenInputs
from gradlens.errors import GradlensError
from gradlens.grads import softmax_view
from gradlens.losses import LossParams, get_loss
from gradlens.losses.m2po import second_moment_mask


def test_tc14_dppo_binary_tv_and_kl_masks() -> None:
    report = cli_report("literal_tc14_dppo.yaml")
    # seq 0: Δπ = +0.1, D = 0.020136: kept, g = −min(1.25, 3) = −1.25
    # seq 1: Δπ = +0.2 > 0.15, D = 0.082283 > 0.05 with π > π_old: masked (upper)
    # seq 2: Δπ = −0.2 < −0.15, D = 0.082283 with π < π_old: masked (lower)
    # seq 3: A < 0, π rose: kept, weight min(4, C = 3) = 3, g = +3 (ppo_clip: +4)
    for name in ("dppo_tv", "dppo_kl"):
        assert coefficients(report, name) == pytest.approx([-1.25, 0.0, 0.0, 3.0], abs=ABS)
        assert token_grad(report, name, 0) == pytest.approx([-0.625, 0.25, 0.1875, 0.125, 0.0625])
        assert token_grad(report, name, 3) == pytest.approx(
            [1.5, -0.6, -0.45, -0.3, -0.15], abs=ABS
        )
        clip = loss_json(report, name)["clipping"]
        assert (clip["upper"], clip["lower"], clip["region"]) == (0.25, 0.25, 0.5)
        assert clip["shares"]["ratio_capped"] == 0.25  # verl's pg_clipfrac_lower for DPPO
    assert coefficients(report, "ppo_clip") == pytest.approx([-1.25, 0.0, 0.0, 4.0], abs=ABS)


def test_tc14_dppo_cap_none_is_the_untruncated_ratio() -> None:
    # verl's example script sets clip_ratio_c = 10000: seq 3 then keeps r = 4
    report = cli_report("literal_tc14_dppo.yaml", "loss.dppo_cap=null")
    assert coefficients(report, "dppo_tv") == pytest.approx([-1.25, 0.0, 0.0, 4.0], abs=ABS)
    assert "ratio_capped" not in loss_json(report, "dppo_tv")["clipping"]["shares"]


def test_tc14_the_masks_are_on_the_probability_not_the_ratio() -> None:
    # Same ratio r = 1.25 at a low probability: π_θ(y) = 0.05 (y = 4), π_old = 0.04, Δπ = 0.01:
    # DPPO keeps the token at any δ ≥ 0.01; PPO-clip with eps_high = 0.2 clips it (1.25 > 1.2).
    report = run_compare(
        validate(
            {
                "dtype": "float64",
                "losses": ["dppo_tv", "ppo_clip"],
                "loss": {"eps_high": 0.2, "aggregation": "token_sum"},
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
        assert token_grad(report, name, 1) == pytest.approx(
            [0.069315, -0.027726, -0.020794, -0.013863, -0.006931], abs=SIX
        )
    # loss = (−1.111111 + 0.001110) + 0.048045 + (1.428571 + 0.012722) = 0.379337
    assert loss_json(report, "prime_rl")["loss"] == pytest.approx(0.379337, abs=SIX)
    assert loss_json(report, "prime_rl")["clipping"]["shares"]["clip_upper"] == pytest.approx(1 / 3)
    assert loss_json(report, "prime_ipo")["clipping"]["shares"]["tv_masked"] == pytest.approx(2 / 3)


def test_prime_rl_ratio_carries_its_gradient() -> None:
    # The ratio is not detached: the closed form −A·r_μ is also what autograd gives through
    # −A·exp(ℓ − ℓ_μ) (a detached ratio would be −A·r_μ too, but its per-token loss would be
    # −A·r_μ·ℓ; the loss value tells them apart): seq 0 contributes −A·r_μ = −1.111111.
    report = cli_report("literal_tc15_prime.yaml", "loss.prime_kl_tau=0")
    assert loss_json(report, "prime_rl")["loss"] == pytest.approx(-1.111111 + 1.428571, abs=SIX)


def test_tc16_m2po_masks_the_largest_second_moment() -> None:
    report = cli_report("literal_tc16_m2po.yaml")
    # M2 = [0.25, 0.01, 0]: the rest's mean 0.086667 ≥ 0.04, then 0.005 < 0.04: one masked
    assert coefficients(report, "m2po") == pytest.approx([0.0, 1.0, -1.0], abs=ABS)
    assert coefficients(report, "ppo_clip") == pytest.approx([-1.0, 1.0, -1.0], abs=ABS)
    assert loss_json(report, "m2po")["clipping"]["shares"]["m2_masked"] == pytest.approx(1 / 3)
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


def test_tc17_aspo() -> None:
    report = cli_report("literal_tc17_aspo.yaml")
    # seq 0 (A = +1, r = 1.315789): low-entropy token clipped at 1.2, the π token (width 0.4)
    #   gets the flipped weight −A/r = −0.76; seq 1 (A = −1, r = 0.714286): low clipped at 0.8,
    #   π token −A·r = +0.714286; seq 2: −1/0.625 = −1.6; seq 3 (y = 4, r = 0.25 < 1/3): −c⁺ = −3;
    #   seq 4 (A = −1, r = 4 > c⁻): +3
    assert coefficients(report, "aspo") == pytest.approx(
        [0.0, -0.76, 0.0, 0.714286, -1.6, -3.0, 3.0], abs=SIX
    )
    assert token_grad(report, "aspo", 1) == pytest.approx(
        [-0.38, 0.152, 0.114, 0.076, 0.038], abs=SIX
    )
    assert token_grad(report, "aspo", 5) == pytest.approx([1.5, 0.6, 0.45, 0.3, -2.85], abs=SIX)
    assert token_grad(report, "aspo", 6) == pytest.approx([1.5, -0.6, -0.45, -0.3, -0.15], abs=SIX)
    shares = loss_json(report, "aspo")["clipping"]["shares"]
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


def test_tc18_gradient_preserving_clip() -> None:
    report = cli_report("literal_tc18_gppo.yaml")
    # seq 0: A>0, r = 2 > 1.28: −β₂·1.28 = −1.28 (ppo_clip 0); seq 1: A<0, r < 0.8: −A·β₁·0.8
    # = 0.2 (gppo: 0.8); seq 2: r = 4 > c = 3: dual clip, 0; seq 3: inside, −1.25
    assert coefficients(report, "ce_gppo") == pytest.approx([-1.28, 0.2, 0.0, -1.25], abs=ABS)
    assert coefficients(report, "gppo") == pytest.approx([-1.28, 0.8, 0.0, -1.25], abs=ABS)
    assert coefficients(report, "ppo_clip") == pytest.approx([0.0, 0.0, 0.0, -1.25], abs=ABS)
    assert token_grad(report, "ce_gppo", 0) == pytest.approx([-0.64, 0.256, 0.192, 0.128, 0.064])
    assert token_grad(report, "ce_gppo", 1) == pytest.approx([0.1, -0.04, -0.03, -0.02, -0.01])
    clip = loss_json(report, "ce_gppo")["clipping"]
    assert (clip["region"], clip["dual"]) == (0.5, 0.25)
    # without the dual clip seq 2 keeps −A·r = 4
    no_dual = cli_report("literal_tc18_gppo.yaml", "loss.dual_clip=null")
    assert coefficients(no_dual, "ce_gppo")[2] == pytest.approx(4.0, abs=ABS)


def test_tc20_gmpo_clips_tokens_inside_the_geometric_mean() -> None:
    report = cli_report("literal_tc20_gmpo.yaml")
    # δ₀ = ln 2 > 0.4 → 0.4; ρ = exp((0.4 − 0.105361)/2) = 1.158724; a = 1/2
    assert coefficients(report, "gmpo") == pytest.approx([0.0, -0.579362], abs=SIX)
    assert token_grad(report, "gmpo", 1) == pytest.approx([-0.318649, 0.318649], abs=SIX)
    assert loss_json(report, "gmpo")["loss"] == pytest.approx(-1.158724, abs=SIX)
    assert loss_json(report, "gmpo")["clipping"]["upper"] == 0.5
    # with π_old(y) = 0.5 on token 0 nothing is clipped: ρ = √1.08, c = −0.519615 on both
    config = validate(json.loads(json.dumps(cli_report("literal_tc20_gmpo.yaml")["config"])))
    data = config.model_dump(mode="json")
    data["source"]["sequences"][0]["positions"][0]["old_prob"] = 0.5
    unclipped = run_compare(validate(data))
    assert [t.coefficient for t in unclipped.losses[0].tokens or []] == pytest.approx(
        [-0.519615, -0.519615], abs=SIX
    )
