"""Parity explains itself: each pattern on a hand-built batch whose factor is known exactly.

The batch (`hand_batch`): four rows of lengths 1, 3, 0 and 2 (padded length T = 3), so
N_tok = 6, B = 4 rows, B' = 3 rows with a token. c_A is the per-token gradient g_t times A's
aggregation weight, c_B the same g_t times B's, so c_B/c_A is exactly the ratio of the weights.
"""

from __future__ import annotations

import torch
from helpers import make_batch

from gradlens.compare.findings import checks
from gradlens.compare.parity import patterns
from gradlens.compare.parity_patterns import Pair, Variant, ratio_text
from gradlens.containers import Batch
from gradlens.diagnostics.clipping import clipping
from gradlens.losses import Aggregation, aggregation_weights
from gradlens.results import BatchSummary, ParityReport

F64 = torch.float64
MASK = torch.tensor(
    [[True, False, False], [True, True, True], [False, False, False], [True, True, False]]
)
# g_t: distinct non-zero values, so a factor cannot hide in g
G = torch.tensor(
    [[0.5, 0.0, 0.0], [-1.0, 0.25, 2.0], [0.0, 0.0, 0.0], [1.5, -0.75, 0.0]], dtype=F64
)
TOL = 1e-9  # float64 parity tolerance


def hand_batch(dtype: torch.dtype = F64) -> Batch:
    n, t = MASK.shape
    hidden = torch.zeros(n, t, 2, dtype=dtype)
    weight = torch.eye(3, 2, dtype=dtype)
    return make_batch(hidden, weight, torch.zeros(n, t), MASK, old_logp=torch.zeros(n, t))


def c(mode: str, all_rows: bool = False, mask: torch.Tensor = MASK) -> torch.Tensor:
    return aggregation_weights(mask, mode, None, F64, all_rows) * G


def explain(ca: torch.Tensor, cb: torch.Tensor, pair: Pair | None = None, rel=None) -> list[str]:
    batch = hand_batch()
    pair = pair or Pair(Aggregation(), False, True, torch.zeros_like(MASK))
    logp = torch.zeros(MASK.shape, dtype=F64)
    return patterns(batch, logp, ca, cb, TOL, pair, rel)


def test_token_mean_vs_seq_mean_token_mean_is_named_per_sequence() -> None:
    # token_mean a = 1/N_tok = 1/6; seq_mean_token_mean a = 1/(B'·|y_i|) = 1/(3·|y_i|):
    # c_B/c_A = 6/(3·|y_i|) = 2 (row 0), 2/3 (row 1), 1 (row 3): constant within each sequence
    (note,) = explain(c("token_mean"), c("seq_mean_token_mean"))
    assert note.startswith("constant within each sequence: ratio c_B/c_A = N_tok/(B'·|y_i|)")
    assert "i.e. token_mean (A) vs seq_mean_token_mean (B)" in note


def test_counting_empty_rows_is_named_b_prime_over_b() -> None:
    # seq_mean_token_mean over B' = 3 (A) and over all B = 4 rows (B): c_B/c_A = 3/4 everywhere
    pair = Pair(Aggregation("seq_mean_token_mean"), False, True, torch.zeros_like(MASK))
    (note,) = explain(c("seq_mean_token_mean"), c("seq_mean_token_mean", True), pair)
    assert note.startswith("on every token: ratio c_B/c_A = B'/B = 3/4 = 0.75")
    assert "over all B rows (count_empty_sequences) (B)" in note


def test_dr_grpo_norms_differ_by_one_over_b_prime() -> None:
    # token_sum_norm a = 1/L = 1/3; seq_mean_token_sum_norm a = 1/(B'·L) = 1/9: ratio 1/B'
    pair = Pair(Aggregation("token_sum_norm"), False, True, torch.zeros_like(MASK))
    (note,) = explain(c("token_sum_norm"), c("seq_mean_token_sum_norm"), pair)
    assert note.startswith("on every token: ratio c_B/c_A = 1/B' = 1/3 = 0.333333")


def test_a_sum_where_the_other_averages_is_n_tok() -> None:
    (note,) = explain(c("token_mean"), c("token_sum"))  # a = 1 vs 1/6: c_B/c_A = 6
    assert note.startswith("on every token: ratio c_B/c_A = N_tok = 6,")


def test_renormalising_rejection_is_named_n_tok_over_n_kept() -> None:
    # a correction rejects row 1 (3 tokens) on both sides; B removes them from its normaliser
    # (verl's rollout_rs): c_B/c_A = (1/N_kept)/(1/N_tok) = 6/3 = 2 on the kept tokens
    rejected = torch.zeros_like(MASK)
    rejected[1] = True
    kept = MASK & ~rejected
    ca = torch.where(kept, c("token_mean"), 0.0)
    cb = torch.where(kept, c("token_mean", mask=kept), 0.0)
    pair = Pair(Aggregation(), False, True, rejected)
    (note,) = explain(ca, cb, pair)
    assert note.startswith("on every token: ratio c_B/c_A = N_tok/N_kept = 6/3 = 2,")
    assert "without the rejected tokens (renormalize: true; verl's rollout_rs) (B)" in note


def test_a_length_epsilon_is_recognised_and_called_harmless() -> None:
    # verl and OpenRLHF divide by |y_i| + 1e-8: c_B/c_A = |y_i|/(|y_i| + 1e-8)
    lengths = MASK.to(F64).sum(-1, keepdim=True)
    ca = c("seq_mean_token_mean")
    cb = ca * lengths / (lengths + 1e-8)
    (note,) = explain(ca, cb, rel=float((cb - ca).abs().max() / ca.abs().max()))
    assert "ε = 1e-08 on the side of B" in note and "harmless" in note


def test_float32_rounding_gets_a_one_line_hint() -> None:
    # one side rounded to float32: a structureless gap of ~1e-8 relative in a float64 run
    ca = c("token_mean")
    cb = ca.float().double() * (
        1 + 3e-8 * torch.tensor([[1, 0, 0], [-1, 1, 2], [0, 0, 0], [2, -2, 0]])
    )
    rel = float((cb - ca).abs().max() / ca.abs().max())
    assert 1e-9 < rel < 1e-6
    (note,) = explain(ca, cb, rel=rel)
    assert "one side computes in float32" in note


def test_a_constant_with_one_sided_zeros_says_where_it_holds() -> None:
    # B multiplies every token by 5 (no ratio of this batch's counts) but zeroes the last
    # token of row 1: the factor holds only where both are non-zero, and the report says so
    ca = c("token_mean")
    cb = 5 * ca
    cb[1, 2] = 0.0
    zero, factor = explain(ca, cb, Pair(Aggregation(), False, False, torch.zeros_like(MASK)))
    assert "zero in one loss only on 0 token(s) (A zero) and 1 token(s) (B zero)" in zero
    assert factor.startswith("c_B/c_A = 5 on the tokens where both are non-zero")


def test_ratio_text_cancels_common_symbols() -> None:
    a = Variant("seq_mean_token_mean", False, False)
    b = Variant("seq_mean_token_sum", False, False)
    assert ratio_text(a, b) == "|y_i|"  # 1/B' over 1/(B'·|y_i|)
    assert ratio_text(b, Variant("seq_mean_token_sum", True, False)) == "B'/B"
    assert ratio_text(Variant("token_sum", False, False), Variant("token_mean", False, False)) == (
        "1/N_tok"
    )


def test_failed_check_details_say_greater_than() -> None:
    summary = BatchSummary(
        source="tests",
        num_sequences=1,
        num_tokens=1,
        vocab_size=2,
        hidden_size=1,
        advantages="",
        mean_entropy=None,
        mean_sampled_prob=None,
        mean_abs_advantage=None,
        logp_max=None,
    )
    none_clipped = clipping({}, torch.zeros(MASK.shape, dtype=F64), MASK)
    side = {"name": "x", "loss": 0.0, "grad_norm": 1.0, "clipping": none_clipped, "metrics": {}}
    failed = ParityReport(
        a=side,
        b={**side, "name": "y"},
        coefficient_max_abs_diff=1.0,
        coefficient_rel=0.5,
        differing_tokens=1,
        top=[],
        grad_norm_ratio=2.0,
        loss_diff=0.0,
        grad_logits_rel=0.5,
        row_max_rel=0.5,
        tolerance=1e-9,
        passed=False,
        findings=[],
    )
    passed = failed.model_copy(update={"coefficient_rel": 0.0, "passed": True})
    by_pass = {r.passed: r for r in checks(summary, [], [failed, passed]) if r.name == "parity"}
    # numbers written to 3 significant digits: 0.5 as "0.5", 0.0 as "0"
    assert "= 0.5 > 1e-09" in by_pass[False].detail
    assert "= 0 ≤ 1e-09" in by_pass[True].detail
