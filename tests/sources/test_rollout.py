"""The rollout sampler on the built-in model: no library warnings, and the cache name it uses."""

from __future__ import annotations

import logging
import warnings

import pytest
from torch import nn

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.sources.rollout import cache_keyword

transformers = pytest.importorskip("transformers")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_builtin_model_run_raises_no_library_warning():
    """A real-model run (rollout with a KV cache, training pass, staleness steps) is silent:
    every Python warning is an error here, and transformers' own log is captured — its
    'warn once' messages are forgotten first, so an earlier test cannot have used them up."""
    config = {
        "losses": ["reinforce", "ppo_clip"],
        "source": {"kind": "model", "num_prompts": 2, "group_size": 2, "max_new_tokens": 4},
    }
    log = logging.getLogger("transformers")
    handler = _Records()
    log.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None:
        once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = run_compare(validate(config))
    finally:
        log.removeHandler(handler)
    assert report.model is not None and report.model.rollout is not None
    assert report.model.rollout.completion_tokens > 0
    assert handler.messages == []


class _Old(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class _New(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


def test_the_cache_goes_by_the_name_the_forward_takes():
    assert cache_keyword(_Old()) == "past_key_values"
    assert cache_keyword(_New()) == "cache"
