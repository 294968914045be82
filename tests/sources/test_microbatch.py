"""The memory plan of a pass through a model: packing sequences, sharing forwards, the probe."""

from __future__ import annotations

import pytest
import torch

from gradlens.compare.model_grads import gradient_plan
from gradlens.sources.microbatch import plan_micro_batches, probe

# Four sequences with 3, 1, 4 and 2 loss tokens, s = 100 bytes per sequence, V = 10: a loss
# token costs V·4·3 = 120 bytes, so the sequences cost 100 + 120·m = 460, 220, 580, 340.
TOKENS = [3, 1, 4, 2]


def test_sequences_are_packed_in_order_up_to_the_budget():
    plan = plan_micro_batches(TOKENS, 100, 10, 800)
    # 460 + 220 = 680 ≤ 800; + 580 > 800; 580 + 340 = 920 > 800
    assert plan.groups == [[0, 1], [2], [3]] and not plan.over_budget
    assert plan.bytes_per_token == 120


def test_a_sequence_over_the_budget_goes_alone_and_is_flagged():
    plan = plan_micro_batches(TOKENS, 100, 10, 500)
    # 460 | 220 (680 > 500) | 580 alone, over 500 | 340 (920 > 500)
    assert plan.groups == [[0], [1], [2], [3]] and plan.over_budget


def test_the_whole_batch_in_one_forward_when_it_fits():
    plan, sharing = gradient_plan(TOKENS, 100, 10, 2000, losses=4, gradient_bytes=400)
    # 460 + 220 + 580 + 340 = 1600 ≤ 2000: one forward, all four losses through it
    assert plan.single and sharing == 4


def test_losses_share_forwards_as_far_as_their_summed_gradients_fit():
    # budget 1500, a summed gradient 400 bytes, the largest sequence 580:
    #   k = 4, 3: 1500 − 1600 and 1500 − 1200 = 300 leave no room for 580
    #   k = 2: 700 → [0, 1] [2] [3], 3 micro-batches × ⌈4/2⌉ = 6 forwards
    #   k = 1: 1100 → [0, 1] [2, 3], 2 micro-batches × 4 = 8 forwards
    plan, sharing = gradient_plan(TOKENS, 100, 10, 1500, losses=4, gradient_bytes=400)
    assert sharing == 2 and plan.groups == [[0, 1], [2], [3]]


def test_one_loss_at_a_time_when_no_sum_fits_beside_the_largest_sequence():
    # budget 900: k = 1 leaves 500 < 580, so the plan is the budget's own, one loss per forward
    plan, sharing = gradient_plan(TOKENS, 100, 10, 900, losses=4, gradient_bytes=400)
    assert sharing == 1 and plan.groups == [[0, 1], [2], [3]]


@pytest.mark.slow
def test_the_probe_counts_what_autograd_keeps():
    transformers = pytest.importorskip("transformers")
    from gradlens.containers import Sequences

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()

    def seqs(length: int) -> Sequences:
        ids = torch.randint(0, 50, (3, length))
        ones = torch.ones_like(ids)
        return Sequences(ids, ones, torch.arange(length)[None].expand(3, -1), ones[:, 1:].bool())

    short, long = probe(model, seqs(8), 1.0, False), probe(model, seqs(16), 1.0, False)
    # float32 activations: each block keeps at least its input, L·H·4 bytes, per sequence
    assert short >= 2 * 8 * 16 * 4
    # every saved tensor grows with the positions (at least linearly; attention may add L²)
    assert 2 * short <= long <= 4 * short
    with torch.no_grad():
        assert probe(model, seqs(8), 1.0, False) == short  # autograd enabled inside
