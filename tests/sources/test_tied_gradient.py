"""`tied_gradient_in_place`: the lookup's rows go into the lm_head's gradient in place, and the
tied weight's gradient is the one plain autograd sums (float64, to the order of addition).

On the built-in model (tied, padding id 0) the lm_head's backward comes before the lookup's, so
the rows are merged in place; without the lm_head in the graph they go as sparse rows; an
untied or max_norm embedding is left alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from gradlens.compare import run_compare
from gradlens.config import build_config
from gradlens.sources import staleness
from gradlens.sources.checkpoint import builtin_model_dir
from gradlens.sources.forward import head_weight
from gradlens.sources.tied_gradient import TiedHead, tied_gradient_in_place
from gradlens.sources.training_pass_check import TrainingPassMismatch
from tests.sources.test_staleness import TinyLM
from tests.tiny_checkpoints import VOCAB, make_tokenizer


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(
        builtin_model_dir(), dtype=torch.float64, local_files_only=True
    )


def ids_with_padding(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (3, 12), generator=gen)
    ids[0, :3] = model.config.pad_token_id  # the padding id gets no lookup gradient
    ids[1, 4] = ids[1, 7] = ids[2, 2]  # a row looked up three times
    return ids


def logit_loss(model, ids: torch.Tensor, weight, detach: bool = False) -> torch.Tensor:
    """The sampled tokens' −log π, the lm_head read by ``weight()`` after the lookup (as the
    logit path reads it); with ``detach`` the hidden states are cut from the graph."""
    h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    logp = torch.log_softmax(F.linear(h.detach() if detach else h, weight()), -1)
    return -logp[:, :-1].gather(-1, ids[:, 1:, None]).sum()


def test_the_tied_gradient_is_autograds_sum_with_the_rows_merged_in_place(model):
    ids = ids_with_padding(model)
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight and model.config.pad_token_id == 0
    model.zero_grad(set_to_none=True)
    logit_loss(model, ids, lambda: weight).backward()
    plain = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with tied_gradient_in_place(model) as head:
        for _ in range(2):  # a second backward adds into the first's gradient
            logit_loss(model, ids, head.weight).backward()
    assert head.merged == 2
    assert weight.grad.layout == torch.strided  # the optimizer's dense gradient
    torch.testing.assert_close(weight.grad, 2 * plain, rtol=1e-13, atol=1e-15)
    assert "forward" not in vars(model.get_input_embeddings())  # the lookup restored


def test_without_the_lm_head_in_the_graph_the_rows_go_as_sparse_rows(model):
    ids = ids_with_padding(model)
    weight = model.get_input_embeddings().weight
    model.zero_grad(set_to_none=True)
    model.base_model(input_ids=ids, use_cache=False).last_hidden_state.square().sum().backward()
    plain = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with tied_gradient_in_place(model) as head:
        model.base_model(input_ids=ids, use_cache=False).last_hidden_state.square().sum().backward()
    assert head.merged == 0 and weight.grad.is_sparse
    assert not weight.grad.coalesce().indices().eq(0).any()  # no row for the padding id
    torch.testing.assert_close(weight.grad.to_dense(), plain, rtol=1e-13, atol=1e-15)


def test_without_the_lookup_in_the_graph_the_lm_heads_gradient_goes_on_whole(model):
    ids = ids_with_padding(model)
    weight = model.get_input_embeddings().weight
    model.zero_grad(set_to_none=True)
    logit_loss(model, ids, lambda: weight, detach=True).backward()
    plain = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with tied_gradient_in_place(model) as head:
        logit_loss(model, ids, head.weight, detach=True).backward()
    assert head.merged == 0
    torch.testing.assert_close(weight.grad, plain, rtol=0, atol=0)


def test_two_forwards_in_one_backward_sum_both_heads_and_both_lookups(model):
    ids = ids_with_padding(model)
    weight = model.get_input_embeddings().weight
    model.zero_grad(set_to_none=True)
    (
        logit_loss(model, ids, lambda: weight) + logit_loss(model, ids.flip(1), lambda: weight)
    ).backward()
    plain = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with tied_gradient_in_place(model) as head:
        (
            logit_loss(model, ids, head.weight) + logit_loss(model, ids.flip(1), head.weight)
        ).backward()
    assert head.merged == 2
    torch.testing.assert_close(weight.grad, plain, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("tied", "options"),
    [(False, {}), (True, {"max_norm": 1.0}), (True, {"scale_grad_by_freq": True})],
)
def test_untied_or_renormed_embeddings_are_left_alone(tied, options):
    tables = TinyLM(tied, **options)
    with tied_gradient_in_place(tables) as head:
        assert head.weight() is tables.head.weight
        assert "forward" not in vars(tables.embed)


@pytest.mark.slow  # two model-source runs
def test_the_stale_steps_merge_the_rows_in_every_backward(monkeypatch):
    # through the checkpointed (and bf16-recomputed) blocks, the lm_head's backward still comes
    # before the lookup's: every step's backward merges
    readers = []
    plain = staleness.tied_gradient_in_place

    @contextmanager
    def recording(model):
        with plain(model) as head:
            readers.append(head)
            yield head

    monkeypatch.setattr(staleness, "tied_gradient_in_place", recording)
    for grad_dtype in ("model", "bfloat16"):
        overrides = ["source.kind=model", "source.stale.steps=2", "diagnostics.reference=none"]
        run_compare(build_config(None, [*overrides, f"source.stale.grad_dtype={grad_dtype}"]))
        assert readers[-1].merged == 2, grad_dtype


class ScaledEmbedding(nn.Embedding):
    """An embedding with a forward of its own, as Gemma's: the rows times √H."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embedding_dim**0.5


def test_an_embedding_with_its_own_forward_is_left_alone():
    # the in-place lookup would replace the module's forward and drop its scaling
    tables = TinyLM(True)
    tables.embed.__class__ = ScaledEmbedding
    ids = torch.tensor([[1, 2, 3]])
    before = tables.embed(ids)
    with tied_gradient_in_place(tables) as head:
        assert head.weight() is tables.head.weight
        assert "forward" not in vars(tables.embed)
        torch.testing.assert_close(tables.embed(ids), before, rtol=0, atol=0)


def save_gemma3(path: Path) -> Path:
    """A random tied Gemma 3 text model (its embedding scales the rows by √H) behind the code
    tokenizer."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        sliding_window=8, tie_word_embeddings=True, eos_token_id=0, bos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    transformers.Gemma3ForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow  # a model-source run with stale steps, and one with the old lookup
def test_a_gemma3_training_pass_keeps_the_embedding_scale(tmp_path, monkeypatch):
    # Gemma 3 270M's π_old had a mean log-prob of −11.9 against the model's own −0.46 when the
    # stale steps' lookup dropped the √H scaling; the training-pass check now compares the
    # first sequence with the model's own forward, and the run passes
    path = save_gemma3(tmp_path / "gemma3")
    overrides = [
        "source.kind=model", f"source.path={path}", "source.num_prompts=2",
        "source.group_size=2", "source.max_new_tokens=6", "source.reward=length",
        "source.stale.steps=1",
    ]  # fmt: skip
    report = run_compare(build_config(None, overrides))
    assert report.passed

    # the lookup of before, which replaced any tied embedding's forward with a plain one
    @contextmanager
    def plain_lookup(model):
        emb = model.get_input_embeddings()
        emb.forward = lambda ids: F.embedding(ids, emb.weight, emb.padding_idx)
        try:
            yield TiedHead(lambda: head_weight(model))
        finally:
            del emb.forward

    monkeypatch.setattr(staleness, "tied_gradient_in_place", plain_lookup)
    with pytest.raises(
        TrainingPassMismatch,
        match=r"the training pass.s log-probs \(log π_old\) of sequence 0 are not",
    ):
        run_compare(build_config(None, overrides))
