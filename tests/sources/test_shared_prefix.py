"""Shared-prefix packing (gradlens.sources.shared_prefix): the layout, the model check, and the
packed passes against the padded ones."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_checkpoints import save_checkpoint

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.containers import Sequences
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import final_hidden, head_weight, position_ids
from gradlens.sources.shared_prefix import (
    ATTENTION_FACTOR,
    packed_hidden,
    packing_problem,
    pass_positions,
    prefix_layout,
    with_shared_prefix,
)


def grid(prompts: list[list[int]], completions: list[list[list[int]]]) -> Sequences:
    """Prompts left-padded and completions right-padded on one grid, every completion token in
    the loss; ``completions[g]`` are the completions of prompt g."""
    rows = [(p, c) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    width_p = max(len(p) for p, _ in rows)
    width = width_p + max(len(c) for _, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.long)
    loss = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(c)] = torch.tensor(c)
        real[i, width_p - len(p) : width_p + len(c)] = 1
        loss[i, width_p - 1 : width_p - 1 + len(c)] = True
    return Sequences(ids, real, position_ids(real), loss)


def two_groups() -> Sequences:
    return grid(
        [[5, 6, 7, 8, 9, 10], [11, 12, 13]],
        [[[20, 21], [22, 23, 24], [25]], [[30, 31, 32], [33]]],
    )


def test_the_layout_puts_each_token_at_its_position_once_per_prompt():
    seqs = two_groups()
    layout = prefix_layout(seqs)
    assert layout is not None
    # one row per prompt: its tokens once, then each completion
    assert layout.input_ids.shape[0] == 2
    assert layout.positions == 2 * (6 + 2 + 3 + 1)  # rows padded to the longer one
    real = seqs.attention_mask.bool()
    flat_ids = layout.input_ids.reshape(-1)[layout.source]
    flat_pos = layout.position_ids.reshape(-1)[layout.source]
    assert torch.equal(flat_ids[real], seqs.input_ids[real])
    assert torch.equal(flat_pos[real], seqs.position_ids[real])
    # the three completions of prompt 0 read its one copy
    prompt = layout.source[0:3, 0:6]  # the grid's columns 0–5 hold prompt 0 (6 tokens)
    assert torch.equal(prompt[0], prompt[1]) and torch.equal(prompt[0], prompt[2])


def test_the_packed_rows_look_up_only_ids_of_the_batch():
    # no padding on the grid and no id 0; the rows (6 + 2·1 and 6 + 1) have two widths
    seqs = grid([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], [[[20], [21]], [[30]]])
    assert bool(seqs.attention_mask.bool().all())
    layout = prefix_layout(seqs, min_saving=0.0)
    assert layout is not None and layout.input_ids.shape == (2, 8)
    assert set(layout.input_ids.unique().tolist()) <= set(seqs.input_ids.unique().tolist())


def test_a_completion_sees_its_prompt_and_itself_only():
    seqs = two_groups()
    layout = prefix_layout(seqs)
    assert layout is not None
    width = layout.input_ids.shape[1]
    allowed = layout.allowed[0]  # prompt 0: columns 0–5, completions at 6–7, 8–10, 11
    assert allowed.shape == (width, width)
    assert torch.equal(allowed[:6, :6], torch.ones(6, 6, dtype=torch.bool).tril())  # causal
    assert bool(allowed[8:11, :6].all())  # the second completion sees the whole prompt
    assert not bool(allowed[8:11, 6:8].any())  # and not the first completion
    assert bool(allowed[10, 8:11].all()) and not bool(allowed[8, 9:11].any())  # causal in itself
    assert not bool(allowed[11, 6:11].any()) and bool(allowed[11, 11])
    # a padding position (row 1 is shorter) sees itself only: no row without a key
    pad = layout.allowed[1, -1]
    assert int(pad.sum()) == 1 and bool(pad[-1])


def test_no_layout_without_a_saving_or_with_a_gap():
    distinct = grid([[1, 2, 3], [4, 5, 6]], [[[7, 8]], [[9]]])  # no prompt shared
    assert prefix_layout(distinct) is None
    assert packing_problem(object(), distinct) is not None  # no pair shares a prompt
    unchanged, problem = with_shared_prefix(object(), distinct)
    assert unchanged is distinct and problem is None  # nothing to save, nothing to report
    seqs = two_groups()
    gap = seqs.attention_mask.clone()
    gap[1, 3] = 0  # a padded column inside a sequence: not a left-/right-padded grid
    assert prefix_layout(dataclasses.replace(seqs, attention_mask=gap)) is None


def test_a_sliding_window_shorter_than_the_sequences_is_not_packed():
    seqs = two_groups()  # 9 columns
    model = SimpleNamespace(config=SimpleNamespace(sliding_window=4))
    problem = packing_problem(model, seqs)
    assert problem is not None and "sliding window of 4" in problem


def test_long_completions_split_a_group_by_the_attention_bound():
    prompt = list(range(1, 11))
    completions = [[20 + i] * 20 for i in range(6)]  # P = 10, C = 20: L = 30
    seqs = grid([prompt], [completions])
    layout = prefix_layout(seqs)
    assert layout is not None
    rows, width = layout.input_ids.shape
    length = seqs.input_ids.shape[1]
    # k members per row: the largest with (P + k·C)² ≤ factor·k·L²
    k = max(k for k in range(1, 7) if (10 + 20 * k) ** 2 <= ATTENTION_FACTOR * k * length**2)
    assert 1 < k < 6 and rows == math.ceil(6 / k) and width == 10 + 20 * k
    assert layout.positions < seqs.input_ids.numel()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("packed") / "gpt2", "gpt2")
    return load_checkpoint(str(path), torch.device("cpu"), torch.float64).model


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("packed") / "llama", "llama")


def sft_gradients(model, seqs: Sequences) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    hidden = final_hidden(model, seqs, 1.0, False)
    logits = hidden @ head_weight(model).T
    logp = torch.log_softmax(logits, -1).gather(-1, seqs.tokens[..., None])[..., 0]
    (-logp[seqs.loss_mask].mean()).backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_passes_equal_the_padded_ones_in_float64(gpt2):
    # GPT-2 computes in the model's dtype throughout: the two forwards differ only in the
    # shapes of their products (float64 rounding, ~1e-16 per operation)
    seqs = two_groups()
    packed, problem = with_shared_prefix(gpt2, seqs)
    assert problem is None and packed.share_prefix
    h0, g0 = sft_gradients(gpt2, seqs)
    h1, g1 = sft_gradients(gpt2, packed)
    real = seqs.attention_mask[:, :-1].bool()
    torch.testing.assert_close(h1[real], h0[real], rtol=1e-12, atol=1e-12)
    assert bool(h1[~real].eq(0).all())  # the grid's padding: zeros
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_a_wrong_mask_moves_the_passes(gpt2):
    # the check can fail: completions that also see each other are not the grid's sequences
    seqs = two_groups()
    layout = prefix_layout(seqs)
    assert layout is not None
    causal = dataclasses.replace(layout, allowed=torch.ones_like(layout.allowed).tril())
    with torch.no_grad():
        right = packed_hidden(gpt2.base_model, seqs, layout)
        wrong = packed_hidden(gpt2.base_model, seqs, causal)
    real = seqs.attention_mask.bool()
    assert float((wrong[real] - right[real]).abs().max()) > 1e-2


def test_a_model_that_ignores_the_mask_is_not_packed(gpt2, monkeypatch):
    seqs = two_groups()
    base = gpt2.base_model
    forward = type(base).forward

    def causal_only(self, *args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None  # builds its own causal mask: completions see each other
        return forward(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(type(base), "forward", causal_only)
    unchanged, problem = with_shared_prefix(gpt2, seqs)
    assert not unchanged.share_prefix
    assert problem is not None and "does not honour the mask" in problem

    def refuses(self, *args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("only 2D masks")
        return forward(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(type(base), "forward", refuses)
    unchanged, problem = with_shared_prefix(gpt2, seqs)
    assert not unchanged.share_prefix and "ValueError: only 2D masks" in str(problem)


def test_pass_positions_count_what_each_micro_batch_computes():
    seqs = dataclasses.replace(two_groups(), share_prefix=True)
    n, width = seqs.input_ids.shape
    whole = pass_positions(seqs, [list(range(n))])
    layout = prefix_layout(seqs)
    assert layout is not None
    assert whole == {
        "positions": layout.positions,
        "padded_positions": n * width,
        "shared_prefix": True,
    }
    alone = pass_positions(seqs, [[i] for i in range(n)])  # one sequence: nothing to share
    assert alone == {"positions": n * width, "padded_positions": n * width, "shared_prefix": False}


@pytest.mark.slow
def test_the_model_source_packs_where_it_saves_and_not_when_off(llama_path):
    def run(shared: bool):
        return run_compare(
            validate(
                {
                    "losses": ["ppo_clip", "sft"],
                    "source": {
                        "kind": "model",
                        "path": str(llama_path),
                        "prompts": ["def add(a, b):", "class Point:"],
                        "group_size": 3,
                        "max_new_tokens": 6,
                        "rollout_dtype": "float32",
                        "reward": "length",
                        "shared_prefix": shared,
                    },
                }
            )
        )

    on, off = run(True), run(False)
    for report, packed in ((on, True), (off, False)):
        assert report.passed
        model = report.model
        assert model is not None and model.staleness is not None
        for p in (model.gradient_pass, model.staleness.model_pass):
            assert p is not None and p.shared_prefix is packed
            assert (p.positions < p.padded_positions) is packed
    # the same rollout (sampled before any training pass), and the same whole-model gradients
    # up to float32 rounding through two Adam steps (transformers' LlamaRMSNorm computes in
    # float32): far below what a wrong mask changes (O(1) in the log-probs)
    assert on.batch.num_tokens == off.batch.num_tokens
    for a, b in zip(on.losses, off.losses, strict=True):
        assert a.model_grads is not None and b.model_grads is not None
        assert a.model_grads.total_norm == pytest.approx(b.model_grads.total_norm, rel=1e-3)
