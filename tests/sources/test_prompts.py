"""Prompts in a chat template (one BOS, the template's own), the built-in instructions and
their word_limit reward, and a model source run on an instruct-style checkpoint."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.errors import GradlensError
from gradlens.sources.prompts import choose_prompts, prompt_ids, read_builtin_instructions
from gradlens.sources.rewards import WORD_LIMIT, word_limit

transformers = pytest.importorskip("transformers")

from tiny_checkpoints import (  # noqa: E402
    BOS,
    END,
    EOS,
    make_instruct_tokenizer,
    save_checkpoint,
    save_instruct_checkpoint,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return save_instruct_checkpoint(tmp_path_factory.mktemp("chat") / "instruct")


def test_the_chat_template_is_applied_with_a_single_bos():
    tok = make_instruct_tokenizer()
    bos = tok.convert_tokens_to_ids(BOS)
    text = "Describe the moon in at most 8 words."
    ids = prompt_ids(text, tok, chat=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith(BOS) and rendered.endswith("<|assistant|>\n")
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    # what tokenising the rendered text with the tokenizer's own special tokens would give
    doubled = tok(rendered)["input_ids"]
    assert doubled[:2] == [bos, bos]
    # a plain prompt keeps the tokenizer's BOS
    assert prompt_ids(text, tok, chat=False)[0] == bos


def test_the_builtin_instructions_all_state_a_word_limit():
    prompts = read_builtin_instructions()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
    assert all(WORD_LIMIT.search(p) for p in prompts)
    chosen, key = choose_prompts(None, 4, seed=0, chat=True)
    assert key == "source.num_prompts" and set(chosen) <= set(prompts) and len(chosen) == 4


def test_word_limit_reward():
    prompt = "Describe the moon in at most 8 words."
    # w ≤ N: w/N — 4 words of 8 → 0.5; 8 words → 1.0
    assert word_limit(prompt, "a bright rocky moon") == 0.5
    assert word_limit(prompt, "one two three four five six seven eight") == 1.0
    # w > N: 1 − (w − N)/N — 10 words of 8 → 1 − 2/8 = 0.75
    assert word_limit(prompt, " ".join(["w"] * 10)) == 0.75
    assert word_limit(prompt, "") == 0.0
    with pytest.raises(ValueError, match="no word limit"):
        word_limit("Say something.", "anything")


def chat_config(path, **source):
    return validate(
        {
            "losses": ["reinforce", "ppo_clip", "sft"],
            "source": {
                "kind": "model",
                "path": str(path),
                "chat_template": True,
                "group_size": 2,
                "max_new_tokens": 8,
                "rollout_dtype": "float32",
                **source,
            },
        }
    )


@pytest.mark.slow
def test_an_instruct_checkpoint_runs_with_its_chat_template(instruct):
    report = run_compare(chat_config(instruct))
    assert report.passed, [c for c in report.checks if not c.passed]
    rollout = report.model.rollout
    assert rollout.chat_template and rollout.reward == "word_limit"
    instructions = set(read_builtin_instructions())
    assert all(s.prompt in instructions for s in rollout.samples)
    assert all(s.reward == word_limit(s.prompt, s.completion) for s in rollout.samples)
    assert "in its chat template" in report.batch.source
    assert not report.model.notes  # no note about a template left unused


@pytest.mark.slow
def test_the_sequences_hold_the_rendered_prompt_once(instruct):
    from helpers import build_batch

    batch = build_batch(chat_config(instruct, num_prompts=1, group_size=1))
    tok = make_instruct_tokenizer()
    seqs = batch.model_context.sequences
    real = seqs.input_ids[0][seqs.attention_mask[0].bool()].tolist()
    prompt = batch.model_context.rollout.prompts[0]
    expected = prompt_ids(prompt, tok, chat=True)
    assert real[: len(expected)] == expected
    assert real.count(tok.convert_tokens_to_ids(BOS)) == 1


@pytest.mark.slow
def test_a_tokenizer_with_a_template_but_plain_prompts_gets_a_note(instruct):
    report = run_compare(
        chat_config(instruct, chat_template=False, prompts=["hello there"], reward="length")
    )
    assert any("source.chat_template: true" in n for n in report.model.notes)


def test_chat_template_without_a_template_is_an_error_before_the_model_loads(tmp_path, monkeypatch):
    import transformers

    path = save_checkpoint(tmp_path / "llama", "llama")

    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded before the tokenizer's template was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loads)
    with pytest.raises(GradlensError, match=r"^source\.chat_template: .* no chat template"):
        run_compare(chat_config(path))


def test_the_generation_configs_end_of_turn_token_stops_a_completion(instruct):
    from gradlens.sources.checkpoint import load_checkpoint
    from gradlens.sources.rollout import stop_tokens

    loaded = load_checkpoint(str(instruct), torch.device("cpu"), torch.float32)
    tok = loaded.tokenizer
    assert stop_tokens(loaded) == [tok.convert_tokens_to_ids(t) for t in (EOS, END)]


@pytest.mark.slow
def test_chat_template_from_the_command_line(instruct):
    result = runner.invoke(
        app,
        [
            "compare", "--source", "model", "--set", f"source.path={instruct}",
            "--set", "source.chat_template=true", "--set", "source.max_new_tokens=6",
            "--losses", "reinforce,sft", "--check",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "word_limit" in result.stdout


def test_a_prompt_beyond_the_context_names_the_setting_to_change(instruct):
    # the instruct checkpoint has a context of 128 positions
    from gradlens.sources.checkpoint import load_checkpoint
    from gradlens.sources.prompts import tokenize_prompts

    loaded = load_checkpoint(str(instruct), torch.device("cpu"), torch.float32)
    with pytest.raises(GradlensError) as alone:  # max_new_tokens fills the context by itself
        tokenize_prompts(["hi"], "source.prompts", loaded, 1000)
    assert str(alone.value).startswith("source.max_new_tokens: source.prompts[0] is ")
    with pytest.raises(GradlensError) as long:  # a long prompt with a few new tokens
        tokenize_prompts(["word " * 200], "source.prompts", loaded, 4)
    assert str(long.value).startswith("source.prompts[0]: the prompt is ")
