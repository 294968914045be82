"""Progress off a terminal: plain lines on stderr, so a piped or CI run is never silent."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.cli import progress as progress_module
from gradlens.cli.progress import LOG_INTERVAL, progress_lines

runner = CliRunner()


def test_a_task_logs_its_start_a_heartbeat_and_its_end(monkeypatch):
    clock = iter([0.0, 1.0, LOG_INTERVAL + 2.0, LOG_INTERVAL + 3.0, 40.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    update = progress_lines(Console(file=out, force_terminal=False, width=200))
    update("sampling", 0, 24)  # t = 0: start
    update("sampling", 1, 24)  # t = 1: too soon for another line
    update("sampling", 12, 24)  # t = 17: a heartbeat
    update("sampling", 13, 24)  # t = 18: too soon
    update("sampling", 24, 24)  # t = 40: done
    assert out.getvalue().splitlines() == [
        "gradlens: sampling … (0/24)",
        "gradlens: sampling 12/24 after 17 s",
        "gradlens: sampling done (24/24) in 40.0 s",
    ]


@pytest.mark.slow
def test_a_piped_model_run_logs_every_phase():
    result = runner.invoke(
        app,
        [
            "compare", "--source", "model", "--losses", "reinforce,sft",
            "--set", "source.num_prompts=1", "--set", "source.group_size=2",
            "--set", "source.max_new_tokens=4",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    done = [line for line in result.stderr.splitlines() if " done (" in line]
    phases = [line.split(" done (")[0].removeprefix("gradlens: ") for line in done]
    assert phases == [
        "loading checkpoint",
        "sampling",
        "stale steps",
        "lm_head diagnostics",
        "model grads",
    ]
    assert "gradlens:" not in result.stdout  # the report stays clean


@pytest.mark.slow
def test_the_synthetic_default_stays_silent():
    result = runner.invoke(app, ["compare", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert "gradlens:" not in result.stderr
