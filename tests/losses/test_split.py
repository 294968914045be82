"""The split weights of every convention, computed by hand (docs/split.md has the same example).

The batch: four sequences of lengths 1, 3, 2, 2 (padded length T = 3), so N_tok = 8, B = 4.
The split micro=1, dp=2, ga=2 makes four micro-batches of one row each:

    micro-batch 0: row 0 (1 token),  rank 0, step 0
    micro-batch 1: row 1 (3 tokens), rank 1, step 0
    micro-batch 2: row 2 (2 tokens), rank 0, step 1
    micro-batch 3: row 3 (2 tokens), rank 1, step 1

Every framework averages the dp = 2 ranks (×1/2) and sums the ga = 2 steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.losses.frameworks.conventions import CONVENTIONS, resolve_convention
from gradlens.losses.split import Split, full_weights, micro_batches, split_weights

LENGTHS = [1, 3, 2, 2]
MASK = torch.arange(3)[None, :] < torch.tensor(LENGTHS)[:, None]  # [4, 3]
SPLIT = Split(micro=1, dp=2, ga=2)


def per_row(weights: torch.Tensor) -> list[float]:
    """The weight of each row's tokens (the same on every token of a row in these modes)."""
    return [float(weights[i, 0]) for i in range(len(LENGTHS))]


def weights(convention: str, mode: str = "token_mean", mask: torch.Tensor = MASK):
    _, rule = resolve_convention(convention, mode)
    return per_row(split_weights(mask, rule, SPLIT)), per_row(full_weights(mask, rule))


def test_micro_batches_are_contiguous_rows_rank_fastest() -> None:
    parts = micro_batches(SPLIT, 4)
    assert [(p.rank, p.step, p.start, p.stop) for p in parts] == [
        (0, 0, 0, 1),
        (1, 0, 1, 2),
        (0, 1, 2, 3),
        (1, 1, 3, 4),
    ]


def test_verl_global_token_count_is_invariant() -> None:
    # verl 0.7–0.9 token-mean: each micro-batch Σ/N_step·dp = Σ/8·2; rank average ×1/2 → 1/8,
    # the full batch's token_mean weight 1/N_tok = 1/8 on every token.
    split, full = weights("verl")
    assert split == pytest.approx([1 / 8] * 4, abs=0, rel=1e-15)
    assert full == pytest.approx([1 / 8] * 4, abs=0, rel=1e-15)


@pytest.mark.parametrize("convention", ["trl:bnpo", "verl_legacy"])
def test_local_token_mean_down_weights_long_micro_batches(convention: str) -> None:
    # TRL bnpo and verl ≤ 0.6 token-mean: each micro-batch Σ/N_j, ÷ga = ÷2, rank average ×1/2:
    # w = 1/(4·N_j) = 1/4, 1/12, 1/8, 1/8 for N_j = 1, 3, 2, 2; the full batch 1/8 everywhere:
    # ratios 2, 2/3, 1, 1 — the 3-token micro-batch counts a third as much per token as the
    # 1-token one.
    split, full = weights(convention)
    assert split == pytest.approx([1 / 4, 1 / 12, 1 / 8, 1 / 8], rel=1e-15)
    assert full == pytest.approx([1 / 8] * 4, rel=1e-15)


@pytest.mark.parametrize("convention", ["trl:dapo", "trl:cispo", "openrlhf"])
def test_global_token_mean_conventions_are_invariant(convention: str) -> None:
    # TRL dapo: Σ / (num_items_in_batch/num_processes · ga/steps_per_generation) = Σ/(8/2·1)
    # = Σ·2/8, rank average ×1/2 → 1/8. OpenRLHF: Σ/(N/gas)·dp = Σ·2·2/8, DeepSpeed ÷gas and
    # rank average ×1/2 → 1/8.
    split, full = weights(convention)
    assert split == pytest.approx([1 / 8] * 4, rel=1e-15)
    assert full == pytest.approx([1 / 8] * 4, rel=1e-15)


def test_ms_swift_divides_by_the_accumulation_steps_twice() -> None:
    # ms-swift dapo (issue 10117): TRL's global normaliser, Σ·2/8, then ÷ga once more = ÷2,
    # rank average ×1/2 → 1/16: every token at half its weight, the learning rate ∝ 1/ga.
    split, full = weights("ms_swift")
    assert split == pytest.approx([1 / 16] * 4, rel=1e-15)
    assert full == pytest.approx([1 / 8] * 4, rel=1e-15)


def test_trl_grpo_seq_mean_is_invariant_with_equal_micro_batches() -> None:
    # TRL grpo: each micro-batch (Σ_t/|y_i|).mean() over its 1 row, ÷ga = ÷2, ×1/2 →
    # 1/(4·|y_i|) = 1/4, 1/12, 1/8, 1/8; the full batch 1/(B·|y_i|) with B = 4: the same.
    split, full = weights("trl", "seq_mean_token_mean")
    assert split == pytest.approx([1 / 4, 1 / 12, 1 / 8, 1 / 8], rel=1e-15)
    assert full == pytest.approx(split, rel=1e-15)


def test_an_empty_row_breaks_seq_mean_over_non_empty_sequences() -> None:
    # Row 3 emptied: lengths 1, 3, 2, 0; B' = 3. verl ≤ 0.6 seq-mean-token-mean (S = B'):
    # split 1/(1·|y_i|)·(1/2)·(1/2) = 1/(4|y_i|) = 1/4, 1/12, 1/8; full 1/(3|y_i|) = 1/3, 1/9,
    # 1/6: ×3/4 on every token. TRL grpo counts every row (S = B = 4 both ways): unchanged.
    mask = MASK.clone()
    mask[3] = False
    split, full = weights("verl_legacy", "seq_mean_token_mean", mask)
    assert split[:3] == pytest.approx([1 / 4, 1 / 12, 1 / 8], rel=1e-15)
    assert full[:3] == pytest.approx([1 / 3, 1 / 9, 1 / 6], rel=1e-15)
    split, full = weights("trl", "seq_mean_token_mean", mask)
    assert split[:3] == pytest.approx(full[:3], rel=1e-15)


def test_legacy_verl_sum_norm_scales_by_one_over_dp_ga() -> None:
    # verl ≤ 0.6 seq-mean-token-sum-norm = Σ/L, L = T = 3: split Σ/3 ÷ga ×1/2 = 1/12, full 1/3:
    # ×1/4 = 1/(dp·ga) on every token.
    split, full = weights("verl_legacy", "token_sum_norm")
    assert split == pytest.approx([1 / 12] * 4, rel=1e-15)
    assert full == pytest.approx([1 / 3] * 4, rel=1e-15)


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_full_batch_is_the_split_with_one_micro_batch(name: str) -> None:
    # At micro = B, dp = ga = 1 every factor dp^p·ga^q/dp is 1 and the one micro-batch is the
    # step: the split weights are the aggregation weights of the rule's mode themselves.
    for rule in CONVENTIONS[name].rules:
        one = split_weights(MASK, rule, Split(4))
        assert torch.equal(one, full_weights(MASK, rule))


def test_errors_name_the_fields() -> None:
    with pytest.raises(GradlensError, match=r"micro·dp·ga = 3·1·1 = 3 .* the batch has 4"):
        micro_batches(Split(3), 4)
    with pytest.raises(GradlensError, match=r"unknown convention 'verll'.*did you mean 'verl'"):
        resolve_convention("verll", "token_mean")
    with pytest.raises(GradlensError, match=r"trl:bnpo, trl:dapo"):
        resolve_convention("trl", "token_mean")  # two TRL settings compute token_mean
    with pytest.raises(GradlensError, match=r"no setting 'nope'.*trl:grpo, trl:sapo"):
        resolve_convention("trl:nope", "token_mean")


def test_docs_list_every_convention_and_setting() -> None:
    # docs/split.md's table is written by hand: every --convention and setting must be in it
    text = (Path(__file__).resolve().parents[2] / "docs" / "split.md").read_text("utf-8")
    for name, convention in CONVENTIONS.items():
        assert f"`{name}`" in text
        for rule in convention.rules:
            for setting in rule.names:
                assert f"`{setting}`" in text, (name, setting)
