"""The gap statistics against verl's installed code (float64) and NeMo RL's formulas by hand.

verl's ``masked_mean`` divides by ``mask.sum() + 1e-8``; with a bool mask the sum is int64 and
int64 + 1e-8 is a float32 tensor in which the epsilon rounds away (|y| ≥ 1 has ulp ≥ 1.2e-7),
so verl's means are exact float64 means and both sides agree to a few ulps: EXACT = 1e-12
relative leaves a wide margin, while a wrong normaliser or a wrong sign moves O(1e-3) at least.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from gradlens.diagnostics.gap_statistics import gap_statistics

F64 = torch.float64
EXACT = 1e-12


def close(a: float | None, b: float, tol: float = EXACT) -> bool:
    assert a is not None
    return abs(a - b) <= tol * max(1.0, abs(b))


def gap_batch() -> tuple[Tensor, Tensor, Tensor]:
    """[5, 9] log-probs: ℓ_old spread over (−12, −1e-3), ℓ_μ = ℓ_old + noise ∝ 1/π (the DVP
    paper's shape), and rows of different lengths (every row has a token: verl averages over
    every row, gradlens over the rows with a token)."""
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(5, 9, generator=g, dtype=F64) * 12 - 1e-3
    noise = torch.randn(5, 9, generator=g, dtype=F64) * 0.02 * (1 + (-old).exp().clamp(max=50))
    rollout = (old + noise).clamp(max=-1e-6)
    lengths = torch.tensor([9, 7, 4, 1, 6])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return old, rollout, mask


@pytest.fixture(scope="module")
def verl_helper() -> Any:
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


@pytest.mark.slow
def test_offpolicy_metrics_equal_verl(verl_helper: Any) -> None:
    old, rollout, mask = gap_batch()
    theirs = verl_helper.compute_offpolicy_metrics(old, rollout, mask)
    ours = gap_statistics(old, rollout, mask)
    pairs = {
        "kl": ours.kl,
        "k3_kl": ours.k3_kl,
        "training_ppl": ours.training_ppl,
        "training_log_ppl": ours.training_log_ppl,
        "rollout_ppl": ours.rollout_ppl,
        "rollout_log_ppl": ours.rollout_log_ppl,
        "log_ppl_diff": ours.log_ppl_diff,
        "log_ppl_abs_diff": ours.log_ppl_abs_diff,
        "log_ppl_diff_max": ours.log_ppl_diff_max,
        "log_ppl_diff_min": ours.log_ppl_diff_min,
        "ppl_ratio": ours.ppl_ratio,
        "chi2_token": ours.chi2_token,
        "chi2_seq": ours.chi2_seq,
    }
    assert set(pairs) <= set(theirs)
    for name, value in pairs.items():
        assert close(value, theirs[name]), (name, value, theirs[name])
    assert ours.chi2_token is not None and ours.chi2_token > 1e-4  # a gap there is to measure


def test_ess_equals_verl_token_tis(verl_helper: Any) -> None:
    """verl's ESS of the applied token-TIS weights min(ρ, C) equals gradlens's ``ess``."""
    old, rollout, mask = gap_batch()
    cap = 1.05  # low enough that some ρ are truncated, so the cap matters
    rho = torch.where(mask, (old - rollout).exp(), 0.0)
    weights = rho.clamp(max=cap)
    assert bool((rho[mask] > cap).any())
    theirs = verl_helper.compute_is_metrics(weights, rho, old - rollout, mask, "token", cap, None)[
        "rollout_is_eff_sample_size"
    ]
    # verl divides by mean(w) + 1e-8 before squaring: a relative 2e-8/mean(w) on its ESS
    # (mean(w) ≈ 1), the one epsilon that survives the bool mask
    assert close(gap_statistics(old, rollout, mask, is_cap=cap).ess, theirs, 3e-8)


def test_pearson_and_probability_differences_equal_verl() -> None:
    debug = pytest.importorskip("verl.utils.debug.metrics")
    old, rollout, mask = gap_batch()
    ours = gap_statistics(old, rollout, mask)
    assert close(
        ours.pearson_prob, debug.pearson_correlation_coefficient(old.exp(), rollout.exp(), mask)
    )
    diff = debug.calculate_log_prob_diff(old.exp(), rollout.exp(), mask)
    assert close(ours.prob_diff_mean, float(diff.mean()))
    assert close(ours.prob_diff_max, float(diff.max()))
    assert close(ours.prob_diff_std, float(diff.std()))
    # Pearson of the log-probs (gradlens's own) against numpy's corrcoef of the same numbers
    expected = float(torch.corrcoef(torch.stack([old[mask], rollout[mask]]))[0, 1])
    assert close(ours.pearson_logp, expected)


def test_nemo_metrics_by_hand() -> None:
    """NeMo RL's four metrics on two tokens, ρ = 2 and ρ = 1/2 (Δ = ±ln 2).

    π_old = [0.5, 0.25], μ = [0.25, 0.5] → Δ = [ln 2, −ln 2], |Δ| = ln 2 on both.
      token_mult_prob_error = mean e^{|Δ|} = 2
      gen_kl_error = mean(ρ − 1 − Δ) = ((2 − 1 − ln2) + (½ − 1 + ln2))/2 = ½·½ = 0.25
      policy_kl_error = mean(1/ρ − 1 + Δ): the same two terms swapped = 0.25
      JS: m = (0.5 + 0.25)/2 = 0.375 on both tokens; per token
          ½k3(ln(0.5/0.375)) + ½k3(ln(0.25/0.375)) with k3(r) = e^r − 1 − r
        = ½(4/3 − 1 − ln 4/3) + ½(2/3 − 1 − ln 2/3) = ½(−ln 4/3 − ln 2/3) = −½ ln(8/9)
        = ½ ln(9/8) = 0.0588915…, the same on the second token.
      k2 = mean ½Δ² = ½ ln²2 = 0.2402265…, k1 = mean(−Δ) = 0.
    """
    old = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)
    rollout = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    s = gap_statistics(old, rollout, mask)
    assert close(s.mult_prob_error, 2.0)
    assert close(s.k3_kl, 0.25)
    assert close(s.reverse_k3_kl, 0.25)
    assert close(s.js_divergence, 0.5 * math.log(9 / 8))
    assert close(s.k2_kl, 0.5 * math.log(2) ** 2)
    assert close(s.kl, 0.0)
    # ρ = 2 and 1/2 are both outside [0.9, 1.1]; ess_raw = (mean ρ)²/mean ρ² = 1.25²/2.125
    assert s.outside_band == 1.0
    assert close(s.ess_raw, 1.25**2 / 2.125)
    # TIS weights min(ρ, 2) = ρ: ess = ess_raw
    assert close(s.ess, 1.25**2 / 2.125)


def test_equal_passes_give_no_gap() -> None:
    old, _, mask = gap_batch()
    s = gap_statistics(old, old.clone(), mask)
    assert s.kl == 0.0 and s.k3_kl == 0.0 and s.chi2_token == 0.0 and s.chi2_seq == 0.0
    assert s.ess == 1.0 and s.outside_band == 0.0 and s.mult_prob_error == 1.0
    assert close(s.pearson_logp, 1.0) and close(s.ppl_ratio, 1.0)


def test_no_valid_token() -> None:
    old, rollout, mask = gap_batch()
    s = gap_statistics(old, rollout, torch.zeros_like(mask))
    assert s.count == 0 and s.kl is None and s.chi2_seq is None
