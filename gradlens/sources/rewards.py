"""Rewards for sampled completions: built-in functions, or a user's ``module:function``.

A reward function takes the prompt and the completion text and returns a float:
``fn(prompt: str, completion: str) -> float``. ``source.reward`` names a built-in (below) or
``package.module:function``, imported with the current directory on ``sys.path``.

Built-ins:
    python_syntax   the length, in characters / 100, of the longest prefix of the completion
                    (ending at a line break, or the whole completion) with which prompt +
                    completion is still valid Python, complete or not
                    (`codeop.compile_command`). Valid code scores by how much of it there is,
                    so the completions of one prompt rarely tie (a tie gives Â = 0).
    length          completion length in characters / 100 (a reward hackers' favourite; a
                    quick way to get advantages that follow a visible property of the text).
    word_limit      for prompts that state "in at most N words" (the built-in instructions
                    all do): with w the completion's whitespace-separated words, w/N up to the
                    limit and 1 − (w − N)/N beyond it — every word short of the limit or over
                    it costs 1/N, so an answer that uses its budget exactly scores 1. The
                    default reward with ``source.chat_template``.
"""

from __future__ import annotations

import codeop
import importlib
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from gradlens.errors import GradlensError, unknown_name_message

RewardFn = Callable[[str, str], float]


def _valid_so_far(text: str) -> bool:
    """True when ``text`` is valid Python or a valid prefix of it (compile_command → None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            codeop.compile_command(text, "<completion>", "exec")
        except (SyntaxError, ValueError, OverflowError):
            return False
    return True


def python_syntax(prompt: str, completion: str) -> float:
    """Characters / 100 of the longest completion prefix that keeps the code valid."""
    good = 0
    for i, ch in enumerate(completion):
        if ch == "\n" and _valid_so_far(prompt + completion[: i + 1]):
            good = i + 1
    if completion and _valid_so_far(prompt + completion):
        good = len(completion)
    return good / 100.0


def length(prompt: str, completion: str) -> float:
    return len(completion) / 100.0


WORD_LIMIT = re.compile(r"at most (\d+) words?", re.IGNORECASE)


def word_limit(prompt: str, completion: str) -> float:
    """w/N up to the prompt's limit N, 1 − (w − N)/N beyond it (w: words of the completion)."""
    found = WORD_LIMIT.search(prompt)
    if found is None or int(found.group(1)) == 0:
        raise ValueError(
            f"the prompt states no word limit ('in at most N words', N ≥ 1): {prompt[:60]!r}"
        )
    limit = int(found.group(1))
    words = len(completion.split())
    return words / limit if words <= limit else 1 - (words - limit) / limit


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "python_syntax": python_syntax,
    "length": length,
    "word_limit": word_limit,
}


def default_reward(chat_template: bool) -> str:
    """The reward when ``source.reward`` is null: for the built-in prompt set in use."""
    return "word_limit" if chat_template else "python_syntax"


def load_reward(spec: str) -> RewardFn:
    """The built-in named ``spec``, or the function ``module:function`` names."""
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[spec]
        message = unknown_name_message("reward", spec, list(BUILTIN_REWARDS))
        raise GradlensError(f"source.reward: {message}, or give module:function")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise GradlensError(f"source.reward: {spec!r} must look like package.module:function")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise GradlensError(
            f"source.reward: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise GradlensError(f"source.reward: module {module_name!r} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def score(fn: RewardFn, spec: str, prompts: list[str], completions: list[str]) -> list[float]:
    """Call the reward function on each pair; a non-number or non-finite value is an error."""
    rewards = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        try:
            value = float(fn(p, c))
        except Exception as exc:
            raise GradlensError(
                f"source.reward: {spec} failed on sequence {i} ({type(exc).__name__}: {exc})"
            ) from None
        if not math.isfinite(value):
            raise GradlensError(f"source.reward: {spec} returned {value} for sequence {i}")
        rewards.append(value)
    return rewards
