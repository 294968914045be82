"""Prompts of the model source: which ones, and their token ids, as text or in a chat template.

Which: ``source.prompts``, or, when it is null, ``num_prompts`` drawn with the run's seed from a
built-in set —

- the Python prompts of the built-in model (first lines of held-out standard-library ``def``
  and ``class`` statements, ``gradlens/data/tiny_lm/prompts.json``), scored by the
  ``python_syntax`` reward; or
- with ``source.chat_template``, the built-in instructions (``gradlens/data/instructions.json``):
  short one-turn requests that each state a word limit ("... in at most 12 words"), scored by
  the ``word_limit`` reward. They mean something to any instruct model, and the reward
  separates the completions of one prompt by a visible property of the answer.

Token ids: a plain prompt is tokenised with the tokenizer's special tokens
(``add_special_tokens=True``: a BOS where the tokenizer adds one). With ``source.chat_template``
the prompt is the user message of a one-turn conversation, rendered by the tokenizer's own
template with the generation prompt (the assistant header) appended —
``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` — and that text is
tokenised with ``add_special_tokens=False``: the template writes the special tokens it wants
(Llama-style templates open with the BOS token), and adding the tokenizer's own again would
double the BOS.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import torch

from gradlens.containers import LoadedModel
from gradlens.errors import GradlensError
from gradlens.sources.checkpoint import read_builtin_prompts


def instructions_path() -> Path:
    return Path(str(importlib.resources.files("gradlens") / "data" / "instructions.json"))


def read_builtin_instructions() -> list[str]:
    """The built-in instructions (one-turn requests with a word limit)."""
    try:
        data = json.loads(instructions_path().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GradlensError(
            f"source.prompts: the built-in instructions cannot be read ({exc}); give source.prompts"
        ) from None
    return list(data["prompts"])


def choose_prompts(
    prompts: list[str] | None, num_prompts: int, seed: int, chat: bool = False
) -> tuple[list[str], str]:
    """The prompts (config or a built-in set) and the config key that errors should name."""
    if prompts is not None:
        return list(prompts), "source.prompts"
    corpus = read_builtin_instructions() if chat else read_builtin_prompts()
    if num_prompts > len(corpus):
        name = "instructions" if chat else "corpus"
        raise GradlensError(
            f"source.num_prompts: the built-in {name} has {len(corpus)} prompts (got {num_prompts})"
        )
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed))
    return [corpus[int(i)] for i in order[:num_prompts]], "source.num_prompts"


def prompt_ids(text: str, tokenizer: Any, chat: bool) -> list[int]:
    """The token ids of one prompt (see the module docstring)."""
    if not chat:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def tokenize_prompts(
    prompts: list[str], key: str, loaded: LoadedModel, max_new_tokens: int, chat: bool = False
) -> list[list[int]]:
    """Token ids of each prompt; errors for an empty prompt or one that overflows the context.
    With ``chat`` the tokenizer has a template (`load_checkpoint` checked it)."""
    ids = []
    for i, text in enumerate(prompts):
        where = f"{key}[{i}]" if key == "source.prompts" else f"{key} (built-in prompt {i})"
        try:
            tokens = prompt_ids(text, loaded.tokenizer, chat)
        except Exception as exc:  # a template that cannot render a user message
            raise GradlensError(
                f"{where}: the tokenizer's chat template failed ({type(exc).__name__}: {exc})"
            ) from None
        if not tokens:
            raise GradlensError(f"{where}: the prompt is empty after tokenisation")
        if any(t >= loaded.vocab_size for t in tokens):
            raise GradlensError(
                f"{where}: the tokenizer produced ids ≥ the model's vocabulary "
                f"({loaded.vocab_size}); tokenizer and model do not match"
            )
        if loaded.context is not None and len(tokens) + max_new_tokens > loaded.context:
            # the setting to change first: max_new_tokens when it alone fills the context
            alone = max_new_tokens >= loaded.context
            named = f"source.max_new_tokens: {where}" if alone else f"{where}: the prompt"
            raise GradlensError(
                f"{named} is {len(tokens)} tokens; with source.max_new_tokens = "
                f"{max_new_tokens} it needs {len(tokens) + max_new_tokens} positions, but the "
                f"model's context (max_position_embeddings) is {loaded.context}"
            )
        ids.append(tokens)
    return ids
