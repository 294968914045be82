"""Clip-Cov and KL-Cov (``clip_cov``, ``kl_cov``; docs/losses.md §2.18): the batch-level selection
of the tokens whose centred log-prob × advantage covariance is largest.

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    ABS,
    E4,
    SIX,
    cli_report,
    coefficients,
    loss_json,
    random_batch,
    scaled,
    token_grad,
)

from gradlens.grads import closed_form, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss


def test_tc19_clip_cov_and_kl_cov() -> None:
    report = cli_report("literal_tc19_covariance.yaml")
    # cov = [1.609438, 2.995732, −0.223144, −1.609438]; t1 is PPO-clipped (A<0, r = 0.5)
    assert coefficients(report, "ppo_clip") == pytest.approx([-2.0, 0.0, -2.0, 2.0], abs=ABS)
    assert coefficients(report, "clip_cov") == pytest.approx([0.0, 0.0, -2.0, 2.0], abs=ABS)
    # kl_cov: no clip; t1 (largest cov) gets k·sign(ln 0.5) = −0.5 on top of −A·r = 1
    assert coefficients(report, "kl_cov") == pytest.approx([-2.0, 0.5, -2.0, 2.0], abs=ABS)
    assert token_grad(report, "kl_cov", 1) == pytest.approx(scaled(0.5, E4), abs=ABS)
    assert loss_json(report, "kl_cov")["loss"] == pytest.approx(-0.653426, abs=SIX)
    for name in ("clip_cov", "kl_cov"):
        assert loss_json(report, name)["clipping"]["shares"]["cov_selected"] == 0.25


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
