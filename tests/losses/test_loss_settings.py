"""The settings of the losses of docs/losses.md §2.14–§2.27 and of the top-entropy selection
(§2.28): each loss registered with its maths, the config's defaults and names reaching
`LossParams`, bad values named by field, and closed form vs autograd in settings that drive each
of these losses through the branches its defaults do not reach (guarded: the tested batch must
exercise every rule).

The registry-parametrized tests (tests/test_grads.py, tests/losses/test_policy_losses.py) already
run every loss against autograd at its defaults.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from helpers import (
    assert_agrees_with_autograd,
    three_policy_batch,
)

from gradlens.compare import run_compare
from gradlens.config import LossConfig, validate
from gradlens.errors import GradlensError
from gradlens.grads import closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction

# The losses of docs/losses.md §2.14–§2.27, in the order of the docs.
LOSSES = [
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


def test_every_loss_is_registered_with_its_maths_and_source() -> None:
    for name in LOSSES:
        spec = get_loss(name)
        assert spec.formula and spec.grad_formula and spec.zero_when and spec.paper, name
        assert re.search(r"arXiv \d{4}\.\d{5}|\w+ \w+_loss_fn|SkyRL", spec.paper), name
        assert spec.coupling in ("token", "sequence", "group", "batch"), name
        assert spec.fn is not None, name
        module = __import__(spec.fn.__module__, fromlist=["_"])
        doc = module.__doc__ or ""
        assert "Zero when" in doc and "arXiv" in doc, name  # the maths is beside the code


def test_every_loss_setting_reaches_the_loss_params() -> None:
    # A value other than its default for every numeric and boolean setting: each must arrive in
    # LossParams under its own name (LossConfig.params maps the fields by name).
    changed: dict[str, Any] = {}
    for field in dataclasses.fields(LossParams):
        default = getattr(LossParams(), field.name)
        if isinstance(default, bool):
            changed[field.name] = not default
        elif isinstance(default, int):
            changed[field.name] = default + 7
        elif default is None or isinstance(default, float):
            changed[field.name] = 0.625
    changed["aspo_entropy_quantile"], changed["top_entropy_quantile"] = 0.5, 0.25
    changed["clip_cov_lb"], changed["clip_cov_ub"] = -2.0, 2.0
    changed["aspo_clip_c_neg"], changed["aspo_clip_c_pos"] = 1.5, 2.5
    changed["dual_clip"] = 2.5
    del changed["distill"]  # a section, not a number: tests/losses/test_distill.py maps it
    params = LossConfig(**changed).params()
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
def test_bad_loss_settings_name_their_field(section: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=re.escape(message)):
        validate({"loss": section})


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


@pytest.mark.parametrize("name, setting, mode", cycled(LOSSES, list(SETTINGS)))
def test_losses_agree_with_autograd_in_every_setting(name: str, setting: str, mode: str):
    assert_agrees_with_autograd(
        three_policy_batch(5), name, SETTINGS[setting], Aggregation(mode, 5.0)
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
    batch = three_policy_batch(5)
    g = closed_form(batch, softmax_view(batch), get_loss(name), params, Aggregation())
    for region in regions:
        hit = g.terms.regions[region] & batch.mask
        assert 0 < int(hit.sum()) < batch.num_tokens, region


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
