"""One rule for every batch (gradlens.validation): what it refuses, and how it names it.

Every source ends in the same check; each problem is named as the user wrote it (a literal
position's path, a batch file's key, a synthetic setting, or ``batch.field`` for a batch built
in Python), all problems at once, and the fields a model computed are left to the report.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import build_batch, literal_config, make_batch, random_batch, with_teacher

import gradlens.validation as validation
from gradlens.containers import Batch, Origin
from gradlens.errors import GradlensError
from gradlens.validation import all_finite, batch_problems, check_batch, find, non_finite


def python_batch() -> Batch:
    """2 × 3 positions, the last of sequence 1 masked; V = 5, H = 4; valid everywhere."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return make_batch(
        torch.randn(2, 3, 4, generator=gen, dtype=torch.float64),
        torch.randn(5, 4, generator=gen, dtype=torch.float64),
        torch.tensor([[0, 1, 2], [3, 4, 0]]),
        mask,
        old_logp=-torch.ones(2, 3),
    )


def refused(batch: Batch) -> str:
    with pytest.raises(GradlensError) as info:
        check_batch(batch)
    return str(info.value)


def test_a_valid_batch_passes():
    check_batch(python_batch())


def test_values_at_masked_positions_are_never_read():
    batch = python_batch()
    adv, old, tokens = batch.advantages.clone(), batch.old_logp.clone(), batch.tokens.clone()
    adv[1, 2], old[1, 2], tokens[1, 2] = float("nan"), 5.0, -100  # -100: the usual pad id
    check_batch(dataclasses.replace(batch, advantages=adv, old_logp=old, tokens=tokens))


@pytest.mark.parametrize(
    ("field", "index", "value", "expected"),
    [
        ("advantages", (0, 1), float("nan"), "batch.advantages[0, 1]: NaN at a position"),
        ("old_logp", (1, 0), float("-inf"), "batch.old_logp[1, 0]: -inf"),
        ("old_logp", (0, 2), 0.5, "batch.old_logp[0, 2]: log-probability 0.5 > 0"),
        ("tokens", (1, 1), 7, "batch.tokens[1, 1]: token id 7 is outside the vocabulary [0, 5)"),
        ("tokens", (0, 0), -1, "batch.tokens[0, 0]: token id -1"),
        ("hidden", (1, 1, 2), float("inf"), "batch.hidden[1, 1, 2]: +inf"),
        ("weight", (4, 3), float("nan"), "batch.weight[4, 3]: NaN"),
    ],
)
def test_each_problem_is_named_at_its_first_entry(field, index, value, expected):
    batch = python_batch()
    x = getattr(batch, field).clone()
    x[index] = value
    assert expected in refused(dataclasses.replace(batch, **{field: x}))


def test_a_finite_sum_proves_every_entry_finite_and_a_non_finite_one_leaves_it_to_the_scan():
    x = torch.tensor([1.0, -2.0, 3.5])
    assert all_finite(x) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1] = bad
        assert not all_finite(y)
    # +inf and −inf together: the sum is NaN, not a cancellation
    assert not all_finite(torch.tensor([float("inf"), float("-inf"), 0.0]))
    # finite entries whose sum overflows float32: False, and the entry-wise scan finds nothing
    big = torch.full((4,), 3e38)
    assert not all_finite(big) and find(big, non_finite) is None
    batch = python_batch()
    check_batch(dataclasses.replace(batch, weight=torch.full((5, 4), 1e308, dtype=torch.float64)))


def test_every_problem_is_reported_at_once_with_its_count():
    batch = python_batch()
    adv, old = batch.advantages.clone(), batch.old_logp.clone()
    adv[0, :] = float("nan")  # 3 valid positions
    old[1, 1] = 2.0
    err = refused(dataclasses.replace(batch, advantages=adv, old_logp=old))
    assert "the batch has 2 problem(s)" in err
    assert "batch.advantages[0, 0]: NaN" in err and "(3 in all)" in err
    assert "batch.old_logp[1, 1]: log-probability 2 > 0" in err


def test_shapes_and_dtypes():
    batch = python_batch()
    err = refused(dataclasses.replace(batch, advantages=torch.zeros(2, 4)))
    assert "batch.advantages: has shape (2, 4); expected [N, T] = (2, 3)" in err
    err = refused(dataclasses.replace(batch, tokens=batch.tokens.double()))
    assert "token ids are integers" in err
    err = refused(dataclasses.replace(batch, hidden=torch.zeros(2, 3, 5, dtype=torch.float64)))
    assert "batch.hidden: has shape (2, 3, 5)" in err


def test_fields_a_model_computed_are_left_to_the_report():
    batch = python_batch()
    hidden = batch.hidden.clone()
    hidden[0, 0, 0] = float("nan")
    computed = dataclasses.replace(
        batch, hidden=hidden, origin=Origin(computed=frozenset({"hidden"}))
    )
    check_batch(computed)  # a finding of the report (gradlens.diagnostics.non_finite)
    assert [p.field for p in batch_problems(computed)] == ["hidden"]


def test_the_on_policy_old_logp_is_not_read():
    # at on-policy positions ℓ_old is ℓ itself: whatever the tensor holds there is ignored
    batch = python_batch()
    old = batch.old_logp.clone()
    old[0, 0] = float("nan")
    on_policy = torch.zeros(2, 3, dtype=torch.bool)
    on_policy[0, 0] = True
    check_batch(dataclasses.replace(batch, old_logp=old, on_policy=on_policy))


def test_a_literal_position_is_named_by_its_path():
    # logits of 1e39 are finite as YAML numbers but overflow the float32 lm_head the literal
    # source builds from them: the position that states them is named
    cfg = literal_config(
        [
            [{"probs": [0.5, 0.5], "token": 0, "advantage": 1.0}],
            [
                {"probs": [0.5, 0.5], "token": 0, "advantage": 1.0},
                {"logits": [1e39, 0.0], "token": 1, "advantage": 1.0},
            ],
        ],
        ["reinforce"],
        dtype="float32",
    )
    with pytest.raises(GradlensError) as info:
        build_batch(cfg)
    assert "source.sequences[1].positions[1].logits: +inf" in str(info.value)


def test_find_scans_in_blocks(monkeypatch):
    # blocks of 8 entries over a [5, 3, 4] tensor (12 per row: one row per block); the first
    # bad entry in row-major order and the count across blocks
    monkeypatch.setattr(validation, "BLOCK_ELEMENTS", 8)
    x = torch.zeros(5, 3, 4)
    x[2, 1, 3] = float("nan")
    x[4, 0, 0] = float("inf")
    x[0, 2, 1] = float("nan")  # masked out below
    valid = torch.ones(5, 3, dtype=torch.bool)
    valid[0, 2] = False
    found = find(x, non_finite, valid)
    assert found is not None
    assert found.index == (2, 1, 3) and found.count == 2
    assert find(torch.zeros(0, 3), non_finite) is None


def test_a_teachers_shapes_dtypes_and_pairs() -> None:
    # The teacher's tensors by the batch file's key names, every problem at once; the values of
    # a teacher whose shapes are wrong are not read.
    batch = with_teacher(random_batch(2, n=3, t=4, v=9, h=5), 2, k=3, stored=True)
    assert batch.teacher is not None and batch.teacher.topk_ids is not None
    ids = batch.teacher.topk_ids
    cases = [
        ({"topk_ids": ids.double()}, "teacher_topk_ids: has dtype torch.float64; token ids"),
        ({"topk_logp": None}, "teacher_topk_ids: given without teacher_topk_logp"),
        ({"weight": torch.zeros(9, 5)}, "teacher_weight: given without teacher_hidden"),
        ({"bias": torch.zeros(9)}, "teacher_bias: given without teacher_weight"),
        (
            {
                "hidden": torch.zeros(3, 4, 5),
                "weight": torch.zeros(9, 5),
                "logits": torch.zeros(3, 4, 9),
            },
            "teacher_logits: given beside teacher_hidden/teacher_weight",
        ),
        (
            {"logits": torch.zeros(3, 4, 8, dtype=torch.float64)},
            "teacher_logits: has shape (3, 4, 8)",
        ),
        (
            {"sampled_logp": torch.zeros(3, 4, dtype=torch.long)},
            "teacher_logp: has dtype torch.int64",
        ),
    ]
    for change, expected in cases:
        teacher = dataclasses.replace(batch.teacher, **change)
        with pytest.raises(GradlensError) as info:
            check_batch(dataclasses.replace(batch, teacher=teacher))
        assert expected in str(info.value), (expected, str(info.value))


def test_a_teachers_values_at_positions_in_the_loss() -> None:
    batch = with_teacher(random_batch(2, n=3, t=4, v=9, h=5), 2, k=3, stored=True)
    assert batch.teacher is not None and batch.teacher.topk_ids is not None
    logp = batch.teacher.topk_logp
    assert logp is not None and bool(batch.mask[0, 0])
    padded = ~batch.mask
    ids, bad_logp = batch.teacher.topk_ids.clone(), logp.clone()
    ids[padded] = 99  # never read: masked positions may hold anything
    bad_logp[padded] = float("nan")
    check_batch(
        dataclasses.replace(
            batch, teacher=dataclasses.replace(batch.teacher, topk_ids=ids, topk_logp=bad_logp)
        )
    )
    ids[0, 0, 2] = ids[0, 0, 1]
    bad_logp[0, 0, 0] = 0.25
    teacher = dataclasses.replace(batch.teacher, topk_ids=ids, topk_logp=bad_logp)
    with pytest.raises(GradlensError) as info:
        check_batch(dataclasses.replace(batch, teacher=teacher))
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "teacher_topk_logp[0, 0, 0]: log-probability 0.25 > 0" in message
    assert "teacher_topk_ids[0, 0, 2]" in message and "appears twice" in message
