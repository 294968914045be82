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
"""

from __future__ import annotations

import codeop
import importlib
import math
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


BUILTIN_REWARDS: dict[str, RewardFn] = {"python_syntax": python_syntax, "length": length}


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
