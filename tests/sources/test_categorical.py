"""`draw`: the inverse-CDF draw gives each index its weight's share, never a zero weight.

The frequencies of 400,000 draws (a fixed seed) are held to 5 standard errors of each
probability; the CDF's ends are checked at u = 0 and the largest u below 1, where u·S rounds
to S itself and no index's running sum exceeds it.
"""

from __future__ import annotations

import pytest
import torch

from gradlens.sources.categorical import draw, draw_at


def test_the_frequencies_are_the_weights_shares_and_zero_weights_are_never_drawn():
    weights = torch.tensor([0.0, 3.0, 0.0, 0.5, 1.5, 0.0, 5.0, 0.0])  # not normalised
    rows = 400_000
    gen = torch.Generator().manual_seed(0)
    y = draw(weights.expand(rows, -1), gen)
    counts = torch.bincount(y, minlength=weights.numel()).double()
    p = (weights / weights.sum()).double()
    assert counts[p == 0].sum() == 0
    se = (p * (1 - p) / rows).sqrt()
    assert ((counts / rows - p).abs() <= 5 * se).all(), (counts / rows, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_ends_of_the_cdf_take_the_first_and_last_positive_weights(dtype):
    weights = torch.zeros(3, 262_144, dtype=dtype)
    weights[0, [5, 70_000, 262_100]] = 1.0
    weights[1, 0] = 1.0
    weights[2, [1, 262_143]] = torch.tensor([2.0**-20, 1.0], dtype=dtype)
    below_one = torch.full((3, 1), 1.0 - 2.0**-53, dtype=torch.float64)
    assert draw_at(weights, torch.zeros(3, 1, dtype=torch.float64)).tolist() == [5, 0, 1]
    assert draw_at(weights, below_one).tolist() == [262_100, 0, 262_143]


def test_u_picks_the_index_whose_cdf_interval_holds_it():
    weights = torch.tensor([[1.0, 0.0, 2.0, 1.0]])  # CDF/S: 0.25, 0.25, 0.75, 1
    for u, index in ((0.0, 0), (0.2499, 0), (0.25, 2), (0.7499, 2), (0.75, 3), (0.999, 3)):
        assert draw_at(weights, torch.tensor([[u]], dtype=torch.float64)).item() == index, u


def test_a_seed_gives_the_same_draws_and_rows_are_drawn_independently():
    probs = torch.softmax(torch.randn(16, 49_152, generator=torch.Generator().manual_seed(1)), -1)
    first = draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, draw(probs, torch.Generator().manual_seed(7)))
    same_rows = draw(probs[:1].expand(512, -1), torch.Generator().manual_seed(7))
    # one nearly flat distribution drawn 512 times: nearly all distinct (a u shared by the
    # rows would give one index)
    assert same_rows.unique().numel() > 256
