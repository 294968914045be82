"""The mismatch tables' numbers: a statistic whose ideal is 1 never reads as exactly 1 when it
is not."""

from __future__ import annotations

import pytest

from gradlens.report.mismatch_table import around_one


@pytest.mark.parametrize(
    "x, text",
    [
        (None, "—"),
        (1.0, "1"),  # exactly 1: plain
        (0.999983, "1 − 1.7e-05"),  # 4 significant digits would print 1
        (1.0004, "1 + 0.0004"),
        (0.99, "0.99"),  # 1e-3 or farther from 1: the usual 4 digits show the gap
        (1.011, "1.011"),
    ],
)
def test_a_value_near_one_shows_its_distance_from_one(x, text):
    assert around_one(x) == text
