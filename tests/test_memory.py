"""Peak memory is estimated from the shapes and checked before anything is allocated.

The estimates are pure functions of the configured sizes; `check_fits` refuses with the
estimate and the memory available; a source or engine that cannot fit is refused before its
builder or engine runs (each test replaces the work with a function that fails if called).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gradlens.compare.run as run
import gradlens.memory as memory
import gradlens.sources as sources
from gradlens.compare.engines import EngineOptions
from gradlens.compare.materialized import estimate_materialized
from gradlens.compare.streamed import estimate_streamed
from gradlens.config import validate
from gradlens.errors import GradlensError
from gradlens.memory import Estimate, Shape, check_fits, human
from gradlens.sources.base import SourceContext
from gradlens.sources.synthetic import plan_synthetic

CPU = torch.device("cpu")


def never(*args, **kwargs):
    raise AssertionError("the work started before its memory was checked")


def with_memory(monkeypatch, free: int) -> None:
    monkeypatch.setattr(memory, "available", lambda device: (free, "the test's budget"))


def test_human_readable_sizes():
    assert human(512) == "512 B"
    assert human(512e9) == "512 GB"
    assert human(41.7e12) == "41.7 TB"


def test_the_synthetic_estimate_from_its_settings():
    # N = 4, T = 8, V = 100, H = 16, float32 (s = 4, softmax dtype 4), logit-noise drift:
    #   hidden  4·8·16·(8 + 4) = 6,144      lm_head 100·16·(8 + 4) = 19,200
    #   logits  3,200 entries·4·(1 + 1 drift) = 25,600
    #   probabilities 3,200·16 = 51,200     noise 3,200·8 = 25,600
    #   lengths and mask 4·(8 + 8) = 64                              total 127,808
    cfg = validate(
        {
            "source": {
                "num_sequences": 4,
                "group_size": 4,
                "min_length": 2,
                "max_length": 8,
                "vocab_size": 100,
                "hidden_size": 16,
            }
        }
    )
    plan = plan_synthetic(cfg.source, SourceContext(CPU, torch.float32))
    assert plan.memory[0].total == 127_808
    assert plan.shape == Shape(4, 8, 100, 16, tokens=4 * 2)  # at least min_length each
    assert plan.provides == frozenset()


def test_check_fits_refuses_with_both_numbers(monkeypatch):
    with_memory(monkeypatch, 10**9)
    estimate = Estimate("the test stage", "source.vocab_size", (("logits", 3 * 10**9),))
    with pytest.raises(GradlensError) as info:
        check_fits(estimate, CPU)
    err = str(info.value)
    assert err.startswith("source.vocab_size: the test stage needs about 3 GB")
    assert "logits 3 GB" in err and "1 GB available (the test's budget)" in err
    check_fits(dataclasses.replace(estimate, terms=(("logits", 10**9),)), CPU)  # fits exactly


def test_nothing_to_compare_with_means_no_refusal(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: None)
    check_fits(Estimate("x", "y", (("z", 10**30),)), CPU)


@pytest.mark.parametrize(
    "setting", ["source.vocab_size=1000000000", "source.num_sequences=1000000000"]
)
def test_a_huge_synthetic_batch_is_refused_before_the_source_allocates(monkeypatch, setting):
    monkeypatch.setitem(
        sources.SOURCES, "synthetic", dataclasses.replace(sources.SOURCES["synthetic"], build=never)
    )
    key, value = setting.split("=")
    cfg = validate({"source": {key.split(".")[1]: int(value)}})
    with pytest.raises(GradlensError) as info:
        run.run_compare(cfg)  # main: a 512 GB (or 8 GB) allocation, "a bug in gradlens"
    assert key in str(info.value) and "needs about" in str(info.value)


def test_an_engine_that_cannot_fit_is_refused_before_the_source_runs(monkeypatch):
    # every sequence 64 tokens long, so M = N·T is known: the materialized engine with its
    # autograd reference needs 48 bytes per [M, V] entry, the source 32: between the two
    cfg = validate(
        {
            "source": {"min_length": 64, "vocab_size": 4096},
            "diagnostics": {"engine": "materialized"},
        }
    )
    shape = Shape(16, 64, 4096, 64, tokens=16 * 64)
    engine = estimate_materialized(shape, torch.float32, reference=True).total
    source = plan_synthetic(cfg.source, run.source_context(cfg, CPU)).memory[0].total
    assert source < engine
    with_memory(monkeypatch, (source + engine) // 2)
    monkeypatch.setitem(
        sources.SOURCES, "synthetic", dataclasses.replace(sources.SOURCES["synthetic"], build=never)
    )
    with pytest.raises(GradlensError) as info:
        run.run_compare(cfg)
    assert "the materialized engine needs about" in str(info.value)


def test_the_streamed_estimate_holds_at_least_one_chunk_whatever_the_budget():
    # a budget of 1 MiB cannot shrink a chunk below 256 vocabulary rows: with M = 10^6 tokens
    # that chunk alone is 3 buffers·4 bytes·10^6·256 ≈ 3.07 GB
    shape = Shape(1000, 1000, 50_000, 64, tokens=10**6)
    options = EngineOptions(reference="none", memory_budget_bytes=2**20)
    estimate = estimate_streamed(shape, torch.float32, 2, options, CPU)
    chunk = dict(estimate.terms)["vocabulary chunks of 256 rows"]
    assert chunk == 4 * (3 * 10**6 + 2 * 2 * 64) * 256
