"""A refusal the configuration decides comes before the expensive work.

The fused engine off CUDA, corrections on a source without rollout log-probs and an output path
that cannot be written are refused before the source builds anything: each test replaces the
source's builder with one that fails if called (on main they came after loading a model,
sampling rollouts or recomputing hidden states).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

import gradlens.engine.fused as fused
import gradlens.sources as sources
from gradlens.cli import app
from gradlens.compare.run import run_compare
from gradlens.config import validate
from gradlens.errors import GradlensError


def never(*args, **kwargs):
    raise AssertionError("the source started work before the refusal")


@pytest.fixture
def no_sources(monkeypatch):
    for kind, entry in list(sources.SOURCES.items()):
        monkeypatch.setitem(sources.SOURCES, kind, dataclasses.replace(entry, build=never))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_fused_engine_off_cuda_is_refused_before_the_model_loads(monkeypatch, no_sources):
    # the tests run Triton's interpreter (conftest); a user's CPU-only run does not
    monkeypatch.setattr(fused.kernels, "INTERPRETING", False)
    monkeypatch.setattr(fused.kernels, "require", lambda: None)
    cfg = validate({"source": {"kind": "model"}, "diagnostics": {"engine": "fused"}})
    with pytest.raises(GradlensError, match="engine 'fused'"):
        run_compare(cfg)


def test_corrections_without_rollout_log_probs_are_refused_before_the_recompute(
    tmp_path, no_sources
):
    path = tmp_path / "batch.pt"
    torch.save(
        {
            "responses": torch.tensor([[1, 2]]),
            "response_mask": torch.ones(1, 2, dtype=torch.long),
            "old_log_probs": -torch.ones(1, 2),
            "advantages": torch.ones(1),
            "prompts": torch.tensor([[3, 4]]),
            "attention_mask": torch.ones(1, 4, dtype=torch.long),
        },
        path,
    )
    cfg = validate(
        {
            "source": {"kind": "batch", "path": str(path), "model_path": "builtin"},
            "loss": {"corrections": [{"kind": "token_tis"}]},
        }
    )
    with pytest.raises(GradlensError, match=r"loss.corrections \(token_tis\) need the rollout"):
        run_compare(cfg)


@pytest.mark.slow
def test_corrections_with_rollout_log_probs_are_not_refused(tmp_path):
    cfg = validate(
        {
            "source": {"rollout_drift": 0.1, "num_sequences": 4},
            "losses": ["reinforce"],
            "loss": {"corrections": [{"kind": "token_tis"}]},
        }
    )
    assert run_compare(cfg).passed


@pytest.mark.slow
def test_a_user_loss_alone_takes_corrections_without_rollout_log_probs(tmp_path):
    # a loss that aggregates itself is not weighted by loss.corrections (docs/cli.md)
    path = tmp_path / "mine.py"
    path.write_text("def fn(logp, old_logp, advantages, mask):\n    return -(logp * mask).sum()\n")
    cfg = validate(
        {
            "source": {"num_sequences": 4},
            "losses": [f"{path}:fn"],
            "loss": {"corrections": [{"kind": "token_tis"}]},
        }
    )
    assert run_compare(cfg).passed


def test_dump_refuses_an_output_it_cannot_write_before_building(tmp_path, no_sources):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["dump", "-o", str(tmp_path / "file" / "batch.pt")])
    assert result.exit_code == 2, result.output
    assert "is a file" in result.stderr
