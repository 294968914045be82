"""Hand-computed test vectors (losses.md §12) run end to end through the literal source and
`run_compare`, in float64.

Unless stated otherwise: V = 5, one position per sequence, z = log π with
π = [0.5, 0.2, 0.15, 0.1, 0.05], sampled y = 0, and the aggregation weight a = 1 (token_mean
over one token). "grad" is ∂L/∂z = c·(e_y − π) with c = a·g. Useful constants:
Σπ² = 0.25 + 0.04 + 0.0225 + 0.01 + 0.0025 = 0.325 and ‖e_0 − π‖ = √(1 − 2·0.5 + 0.325)
= √0.325 = 0.570088.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import PI, literal_config

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.errors import GradlensError
from gradlens.losses import aggregation_weights
from gradlens.results import CompareReport, LossReport, TokenDetail

# float64 throughout: the only error is the rounding of z = log π and of softmax(z) back to π
# (a few ulps, ~1e-16); 1e-12 keeps a wide margin while any formula error here is ≥ 1e-3.
ABS = 1e-12


def position(token: int = 0, advantage: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"probs": PI, "token": token, "advantage": advantage, **extra}


def run(
    sequences: list[list[dict[str, Any]]], loss: str, failing: tuple[str, ...] = (), **settings: Any
) -> LossReport:
    """One loss on a literal batch; every check (finite, zero-sum, agreement) must pass except
    exactly the ``failing`` ones (a batch built to have no gradient fails ``diagnosable``)."""
    report: CompareReport = run_compare(literal_config(sequences, [loss], **settings))
    failed = sorted(c.name for c in report.checks if not c.passed)
    assert failed == sorted(failing), [c for c in report.checks if not c.passed]
    (result,) = report.losses
    assert result.tokens is not None
    return result


def tok(result: LossReport, k: int = 0) -> TokenDetail:
    assert result.tokens is not None
    return result.tokens[k]


def assert_vector(actual: list[float | None], expected: list[float]) -> None:
    assert actual == pytest.approx(expected, abs=ABS)


def norm(vector: list[float | None]) -> float:
    return math.sqrt(sum(x * x for x in vector if x is not None))


ZERO = [0.0] * 5

# ----------------------------------------------------------------------------- TC1, TC2


def test_tc1a_reinforce_positive_advantage() -> None:
    # g = −A = −1, c = a·g = −1; grad = c·(e_0 − π) = −[0.5, −0.2, −0.15, −0.1, −0.05]
    t = tok(run([[position(0, 1.0)]], "reinforce"))
    assert t.coefficient == pytest.approx(-1.0, abs=ABS)
    assert_vector(t.grad_logits, [-0.5, 0.2, 0.15, 0.1, 0.05])
    assert norm(t.grad_logits) == pytest.approx(0.570088, abs=1e-6)  # √0.325
    assert sum(t.grad_logits) == pytest.approx(0.0, abs=ABS)  # zero-sum


def test_tc1b_reinforce_negative_advantage_other_token() -> None:
    # y = 3, A = −2: c = +2, grad = 2·(e_3 − π) = [−1.0, −0.4, −0.3, 2·0.9, −0.1];
    # norm = 2·√(1 − 2·0.1 + 0.325) = 2·√1.125 = 2.121320
    t = tok(run([[position(3, -2.0)]], "reinforce"))
    assert t.coefficient == pytest.approx(2.0, abs=ABS)
    assert_vector(t.grad_logits, [-1.0, -0.4, -0.3, 1.8, -0.1])
    assert norm(t.grad_logits) == pytest.approx(2.121320, abs=1e-6)


def test_tc2_sft_single_token() -> None:
    # y = 1, g = −1 (A ignored: 7 below must not matter): grad = π − e_1
    # = [0.5, 0.2 − 1, 0.15, 0.1, 0.05]; norm = √(1 − 2·0.2 + 0.325) = √0.925 = 0.961769
    t = tok(run([[position(1, 7.0)]], "sft"))
    assert t.coefficient == pytest.approx(-1.0, abs=ABS)
    assert_vector(t.grad_logits, [0.5, -0.8, 0.15, 0.1, 0.05])
    assert norm(t.grad_logits) == pytest.approx(0.961769, abs=1e-6)


def test_tc2_sft_token_mean_halves_each_position() -> None:
    # Two tokens, token_mean: a = 1/2 each, so c = −1/2 and grad = (π − e_1)/2
    # = [0.25, −0.4, 0.075, 0.05, 0.025] at both positions.
    result = run([[position(1), position(1)]], "sft", aggregation="token_mean")
    for k in (0, 1):
        assert tok(result, k).weight == pytest.approx(0.5, abs=ABS)
        assert tok(result, k).coefficient == pytest.approx(-0.5, abs=ABS)
        assert_vector(tok(result, k).grad_logits, [0.25, -0.4, 0.075, 0.05, 0.025])


# ----------------------------------------------------------------------------- TC3–TC5: PPO


def test_tc3a_ppo_clip_unclipped_below_eps_high() -> None:
    # A = +1, π_old(y) = 0.4: r = 0.5/0.4 = 1.25 ≤ 1 + 0.28, unclipped: g = −A·r = −1.25,
    # grad = 1.25·[−0.5, 0.2, 0.15, 0.1, 0.05]; norm = 1.25·0.570088 = 0.712610
    result = run([[position(0, 1.0, old_prob=0.4)]], "ppo_clip", eps_low=0.2, eps_high=0.28)
    t = tok(result)
    assert t.ratio == pytest.approx(1.25, abs=ABS)
    assert t.coefficient == pytest.approx(-1.25, abs=ABS)
    assert_vector(t.grad_logits, [-0.625, 0.25, 0.1875, 0.125, 0.0625])
    assert norm(t.grad_logits) == pytest.approx(0.712610, abs=1e-6)
    c = result.clipping
    assert (c.upper, c.lower, c.region, c.dual, c.zero_grad) == (0.0, 0.0, 0.0, None, 0.0)


def test_tc3b_ppo_clip_clipped_above_eps_high() -> None:
    # eps_high = 0.2: r = 1.25 > 1.2 with A > 0 → M = 0, grad = 0.
    # verl pg_clipfrac = 1, TRL clip_ratio/high_mean = 1, region_mean = 1.
    result = run([[position(0, 1.0, old_prob=0.4)]], "ppo_clip", eps_low=0.2, eps_high=0.2)
    t = tok(result)
    assert t.coefficient == 0.0
    assert_vector(t.grad_logits, ZERO)
    c = result.clipping
    assert (c.upper, c.lower, c.region, c.zero_grad) == (1.0, 0.0, 1.0, 1.0)


def test_tc4a_negative_advantage_low_ratio_is_clipped_lower() -> None:
    # A = −1, π_old(y) = 0.7: r = 0.5/0.7 = 0.714286 < 1 − 0.2 = 0.8 → clipped, grad = 0.
    # TRL low_mean = 1, verl pg_clipfrac = 1; dual clip c = 3 does not fire (r < 3): dual = 0.
    result = run(
        [[position(0, -1.0, old_prob=0.7)]], "ppo_clip", eps_low=0.2, eps_high=0.28, dual_clip=3.0
    )
    t = tok(result)
    assert t.ratio == pytest.approx(0.714286, abs=1e-6)
    assert_vector(t.grad_logits, ZERO)
    c = result.clipping
    assert (c.upper, c.lower, c.region, c.dual) == (0.0, 1.0, 1.0, 0.0)


def test_tc4b_negative_advantage_on_policy_ratio() -> None:
    # A = −1, π_old(y) = 0.5: r = 1, g = −A·r = +1, grad = e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05]
    result = run([[position(0, -1.0, old_prob=0.5)]], "ppo_clip", eps_low=0.2, eps_high=0.28)
    t = tok(result)
    assert t.coefficient == pytest.approx(1.0, abs=ABS)
    assert_vector(t.grad_logits, [0.5, -0.2, -0.15, -0.1, -0.05])
    assert result.clipping.region == 0.0


def test_tc5a_dual_clip_fires() -> None:
    # A = −1, π_old(y) = 0.125: r = 0.5/0.125 = 4 > c = 3 → loss −c·A is constant, grad = 0.
    # verl pg_clipfrac = 0 (not the trust region), pg_clipfrac_lower = 1.
    result = run([[position(0, -1.0, old_prob=0.125)]], "ppo_clip", dual_clip=3.0)
    t = tok(result)
    assert t.ratio == pytest.approx(4.0, abs=ABS)
    assert t.coefficient == 0.0
    assert_vector(t.grad_logits, ZERO)
    c = result.clipping
    assert (c.dual, c.region, c.upper, c.lower, c.zero_grad) == (1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("loss", ["ppo_clip", "ppo"])
def test_tc5b_no_dual_clip_gradient_grows_with_r(loss: str) -> None:
    # No dual clip: A < 0 with a high ratio is not clipped; g = −A·r = 4, c = 4·a = 4,
    # grad = 4·(e_0 − π) = [2.0, −0.8, −0.6, −0.4, −0.2]; norm = 4·0.570088 = 2.280351
    result = run([[position(0, -1.0, old_prob=0.125)]], loss)
    t = tok(result)
    assert t.coefficient == pytest.approx(4.0, abs=ABS)
    assert_vector(t.grad_logits, [2.0, -0.8, -0.6, -0.4, -0.2])
    assert norm(t.grad_logits) == pytest.approx(2.280351, abs=1e-6)
    if loss == "ppo_clip":
        assert result.clipping.region == 0.0 and result.clipping.dual is None


def test_tc5b_coefficient_scales_with_aggregation_weight() -> None:
    # Same token next to a second sequence, seq_mean_token_sum: a = 1/B' = 1/2, so c = 4·a = 2
    # and grad = 2·(e_0 − π) = [1.0, −0.4, −0.3, −0.2, −0.1].
    result = run(
        [[position(0, -1.0, old_prob=0.125)], [position(2, 0.0)]],
        "ppo_clip",
        aggregation="seq_mean_token_sum",
    )
    t = tok(result, 0)
    assert t.weight == pytest.approx(0.5, abs=ABS)
    assert t.coefficient == pytest.approx(2.0, abs=ABS)
    assert_vector(t.grad_logits, [1.0, -0.4, -0.3, -0.2, -0.1])


# ----------------------------------------------------------------------------- TC13


# Two sequences of lengths 1 and 3 (padded T = 3), REINFORCE with A = 1, so c = −a.
TC13_WEIGHTS = {
    # token_mean: 1/N_tok = 1/4 everywhere
    ("token_mean", None): (1 / 4, 1 / 4),
    # seq_mean_token_mean: 1/(B'·|y_i|) = 1/(2·1) and 1/(2·3)
    ("seq_mean_token_mean", None): (1 / 2, 1 / 6),
    # seq_mean_token_sum: 1/B' = 1/2 everywhere
    ("seq_mean_token_sum", None): (1 / 2, 1 / 2),
    # token_sum: 1 everywhere (verl 0.9 token-sum)
    ("token_sum", None): (1.0, 1.0),
    # token_sum_norm: 1/L_scale, L_scale = padded T = 3 when the factor is unset
    ("token_sum_norm", None): (1 / 3, 1 / 3),
    # ... and 1/8 with loss_scale_factor = 8 (no 1/B': verl ≤ 0.6, trap A6)
    ("token_sum_norm", 8.0): (1 / 8, 1 / 8),
    # seq_mean_token_sum_norm: 1/(B'·L_scale) = 1/(2·3) (verl 0.7–0.9 standalone)
    ("seq_mean_token_sum_norm", None): (1 / 6, 1 / 6),
    # ... = 1/(2·8) with loss_scale_factor = 8
    ("seq_mean_token_sum_norm", 8.0): (1 / 16, 1 / 16),
}


@pytest.mark.parametrize(("mode", "scale"), list(TC13_WEIGHTS))
def test_tc13_aggregation_weights(mode: str, scale: float | None) -> None:
    seq1, seq2 = [position(0)], [position(0), position(2), position(4)]
    result = run([seq1, seq2], "reinforce", aggregation=mode, loss_scale_factor=scale)
    a1, a2 = TC13_WEIGHTS[(mode, scale)]
    expected = [a1, a2, a2, a2]
    assert [t.weight for t in result.tokens or []] == pytest.approx(expected, abs=ABS)
    assert [t.coefficient for t in result.tokens or []] == pytest.approx(
        [-a for a in expected], abs=ABS
    )
    # The last token (y = 4): grad = −a₂·(e_4 − π) = a₂·[0.5, 0.2, 0.15, 0.1, −0.95]
    assert_vector(tok(result, 3).grad_logits, [a2 * x for x in [0.5, 0.2, 0.15, 0.1, -0.95]])


def test_tc13_weights_with_an_empty_sequence() -> None:
    # The literal source cannot state an empty sequence, so aggregation_weights directly:
    # TC13's lengths 1 and 3 plus an all-masked middle row. B' = 2 sequences with a token
    # (not N = 3), so the weights are TC13's exactly; masked positions weigh 0.
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    for (mode, scale), (a1, a2) in TC13_WEIGHTS.items():
        expected = torch.tensor([[a1, 0, 0], [0, 0, 0], [a2, a2, a2]], dtype=torch.float64)
        weights = aggregation_weights(mask, mode, scale)
        assert torch.allclose(weights, expected, rtol=0, atol=ABS), mode


# With count_empty_sequences the sequence means divide by every row, B = 3 (TRL, verl's
# trainer), where B' = 2 above: seq_mean_token_mean 1/(3·1), 1/(3·3); seq_mean_token_sum 1/3;
# seq_mean_token_sum_norm (L_scale = 3) 1/(3·3). The token modes do not count sequences.
TC13_ALL_ROWS = {
    "token_mean": (1 / 4, 1 / 4),
    "token_sum": (1.0, 1.0),
    "seq_mean_token_mean": (1 / 3, 1 / 9),
    "seq_mean_token_sum": (1 / 3, 1 / 3),
    "token_sum_norm": (1 / 3, 1 / 3),
    "seq_mean_token_sum_norm": (1 / 9, 1 / 9),
}


@pytest.mark.parametrize("mode", list(TC13_ALL_ROWS))
def test_tc13_weights_counting_the_empty_sequence(mode: str) -> None:
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    a1, a2 = TC13_ALL_ROWS[mode]
    expected = torch.tensor([[a1, 0, 0], [0, 0, 0], [a2, a2, a2]], dtype=torch.float64)
    weights = aggregation_weights(mask, mode, None, count_empty_sequences=True)
    assert torch.allclose(weights, expected, rtol=0, atol=ABS)


# ----------------------------------------------------------------------------- prompt_average


def test_tc13_prompt_average() -> None:
    # ScaleRL's prompt-average: prompt 0 has TC13's sequences (lengths 1 and 3: N_tok,0 = 4),
    # prompt 1 one sequence of length 2 (N_tok,1 = 2); G = 2 prompts. a = 1/(G·N_tok,g):
    # 1/(2·4) = 1/8 on prompt 0's tokens, 1/(2·2) = 1/4 on prompt 1's (token_mean: 1/6 each).
    # REINFORCE with A = 1: c = −a.
    seqs = [[position(0)], [position(0), position(2), position(4)], [position(1), position(3)]]
    config = literal_config(seqs, ["reinforce"], aggregation="prompt_average")
    data = config.model_dump()
    for sequence, group in zip(data["source"]["sequences"], [0, 0, 1], strict=True):
        sequence["group"] = group
    report = run_compare(validate(data))
    assert report.passed, [c for c in report.checks if not c.passed]
    tokens = report.losses[0].tokens or []
    expected = [1 / 8] * 4 + [1 / 4] * 2
    assert [t.weight for t in tokens] == pytest.approx(expected, abs=ABS)
    assert [t.coefficient for t in tokens] == pytest.approx([-a for a in expected], abs=ABS)


def test_prompt_average_reduces_to_token_and_sequence_means() -> None:
    # One prompt: a token mean. One sequence per prompt: the mean over sequences of their token
    # means (seq_mean_token_mean). An empty row is in no count (TC13's mask).
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    one = aggregation_weights(mask, "prompt_average", groups=torch.zeros(3, dtype=torch.int64))
    assert torch.allclose(one, aggregation_weights(mask, "token_mean"), rtol=0, atol=ABS)
    each = aggregation_weights(mask, "prompt_average", groups=torch.arange(3))
    assert torch.allclose(each, aggregation_weights(mask, "seq_mean_token_mean"), rtol=0, atol=ABS)


def test_prompt_average_needs_prompt_groups() -> None:
    with pytest.raises(GradlensError, match=r"source\.group_size"):
        run([[position(0)]], "reinforce", aggregation="prompt_average")


# ----------------------------------------------------------------------------- our own cases


def test_ppo_clip_positive_advantage_low_ratio_is_not_clipped() -> None:
    # Asymmetry (losses.md §2.2): A = +1, π_old(y) = 0.8 → r = 0.5/0.8 = 0.625 < 1 − 0.2,
    # yet A > 0 so M = 1: g = −0.625, grad = 0.625·[−0.5, 0.2, 0.15, 0.1, 0.05]
    # = [−0.3125, 0.125, 0.09375, 0.0625, 0.03125].
    result = run([[position(0, 1.0, old_prob=0.8)]], "ppo_clip")
    assert_vector(tok(result).grad_logits, [-0.3125, 0.125, 0.09375, 0.0625, 0.03125])
    assert result.clipping.region == 0.0


def test_ppo_clip_negative_advantage_high_ratio_is_not_clipped() -> None:
    # A = −1, π_old(y) = 0.4 → r = 1.25 > 1 + 0.2, but A < 0 so only r < 0.8 would clip:
    # g = +1.25, grad = 1.25·(e_0 − π) = [0.625, −0.25, −0.1875, −0.125, −0.0625].
    result = run([[position(0, -1.0, old_prob=0.4)]], "ppo_clip", eps_high=0.2)
    assert_vector(tok(result).grad_logits, [0.625, -0.25, -0.1875, -0.125, -0.0625])
    assert result.clipping.upper == 0.0 and result.clipping.region == 0.0


def test_zero_advantage_is_never_clipped() -> None:
    # A = 0 with r = 4: zero gradient, but counted in no clip region (A12); zero_grad = 1.
    # The gate says so: a batch whose only advantage is 0 cannot support a diagnosis.
    result = run(
        [[position(0, 0.0, old_prob=0.125)]],
        "ppo_clip",
        failing=("diagnosable",),
        eps_high=0.2,
        dual_clip=3.0,
    )
    assert_vector(tok(result).grad_logits, ZERO)
    c = result.clipping
    assert (c.upper, c.lower, c.region, c.dual, c.zero_grad) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_unclipped_ppo_amplifies_by_the_ratio() -> None:
    # ppo, A = +1, π_old(y) = 0.01: r = 0.5/0.01 = 50, g = −50,
    # grad = 50·[−0.5, 0.2, 0.15, 0.1, 0.05] = [−25, 10, 7.5, 5, 2.5]; reported as 50× |A|.
    result = run([[position(0, 1.0, old_prob=0.01)]], "ppo")
    assert_vector(tok(result).grad_logits, [-25.0, 10.0, 7.5, 5.0, 2.5])
    assert any("50×" in note for note in result.findings)


def test_opsm_masks_only_the_negative_advantage_sequence() -> None:
    # Both sequences: π_old(y) = 0.6, so r = 0.5/0.6 = 0.833 (inside [0.8, 1.28]: no clip) and
    # the OPSM statistic mean(ℓ_old − ℓ) = log(0.6/0.5) = 0.1823 > δ = 0.1.
    # Sequence 0 has A = −1 → masked; sequence 1 has A = +1 → kept (one-sided mask).
    # Kept token, token_mean a = 1/2: c = a·(−A·r) = −0.41667,
    # grad = 0.41667·[−0.5, 0.2, 0.15, 0.1, 0.05] = [−0.20833, 0.08333, 0.0625, 0.04167, 0.02083].
    result = run(
        [[position(0, -1.0, old_prob=0.6)], [position(0, 1.0, old_prob=0.6)]],
        "ppo_clip",
        opsm_delta=0.1,
    )
    assert_vector(tok(result, 0).grad_logits, ZERO)
    r = 0.5 / 0.6
    assert tok(result, 1).coefficient == pytest.approx(-r / 2, abs=ABS)
    assert_vector(tok(result, 1).grad_logits, [r / 2 * x for x in [-0.5, 0.2, 0.15, 0.1, 0.05]])
    c = result.clipping
    assert (c.seq_masked_sequences, c.seq_masked_tokens, c.region) == (0.5, 0.5, 0.0)


def test_lm_head_row_norms_of_two_positions() -> None:
    # One sequence, positions TC1a (y = 0, A = +1) and TC1b (y = 3, A = −2), seq_mean_token_sum
    # (a = 1/B' = 1). With h_k = e_k, column k of ∂L/∂W is position k's logit gradient:
    #   G_1 = [−0.5, 0.2, 0.15, 0.1, 0.05],  G_2 = [−1.0, −0.4, −0.3, 1.8, −0.1]
    # Row norms √(G_1v² + G_2v²): row 0 √1.25 = 1.118034, row 1 √0.2 = 0.447214,
    # row 2 √0.1125 = 0.335410, row 3 √3.25 = 1.802776, row 4 √0.0125 = 0.111803.
    # ‖∂L/∂W‖_F = √(0.325 + 4.5) = √4.825 = 2.196588; sampled rows {0, 3} carry
    # (1.25 + 3.25)/4.825 = 0.932642 of it.
    result = run(
        [[position(0, 1.0), position(3, -2.0)]], "reinforce", aggregation="seq_mean_token_sum"
    )
    rows = result.rows
    assert rows.total_norm == pytest.approx(2.196588, abs=1e-6)
    assert [r.token for r in rows.top_rows] == [3, 0, 1, 2, 4]
    assert [r.norm for r in rows.top_rows] == pytest.approx(
        [1.802776, 1.118034, 0.447214, 0.335410, 0.111803], abs=1e-6
    )
    assert [r.sampled for r in rows.top_rows] == [True, True, False, False, False]
    assert rows.sampled_rows.count == 2 and rows.other_rows.count == 3
    assert rows.sampled_rows.sq_share == pytest.approx(4.5 / 4.825, abs=1e-12)
    assert rows.other_rows.max == pytest.approx(0.447214, abs=1e-6)
