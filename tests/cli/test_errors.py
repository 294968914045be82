"""Bad input: one clear message naming every wrong field, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gradlens.cli import app

runner = CliRunner()
PI = [0.5, 0.2, 0.15, 0.1, 0.05]


def literal(**position) -> dict:
    pos = {"probs": PI, "token": 0, "advantage": 1.0, **position}
    return {"source": {"kind": "literal", "sequences": [{"positions": [pos]}]}}


def run_bad(tmp_path, config: dict | str | None, *args: str):
    argv = ["compare", *args]
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        argv += ["--config", str(path)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""  # nothing half-written to the report stream
    return result.stderr


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (
            None,
            ("--losses", "ppo_clp"),
            ["unknown loss 'ppo_clp'", "did you mean 'ppo_clip'", "reinforce, ppo, ppo_clip, sft"],
        ),
        (None, ("--set", "loss.eps_low=-0.1"), ["loss.eps_low", "greater than or equal to 0"]),
        (
            None,
            ("--set", "source.vocab_size=1"),
            ["source.vocab_size", "greater than or equal to 2"],
        ),
        (None, ("--set", "source.vocab_size=abc"), ["source.vocab_size", "integer", "'abc'"]),
        (
            None,
            ("--set", "loss.cliprange=0.2"),
            ["loss.cliprange", "unknown key", "eps_high, eps_low"],
        ),
        (
            None,
            ("--set", "loss.aggregation=token-mean"),
            ["loss.aggregation", "did you mean 'token_mean'"],
        ),
        (None, ("--set", "loss.dual_clip=0.5"), ["loss.dual_clip", "greater than 1"]),
        (None, ("--set", "source.min_length=80"), ["min_length (80) > max_length (64)"]),
        (None, ("--set", "source.entropy=9"), ["entropy 9", "log(vocab_size)"]),
        (None, ("--set", "eps_high"), ["expected key=value"]),
        (None, ("--set", "loss.eps_high.x=1"), ["loss.eps_high", "valid number"]),
        (literal(probs=[0.5, 0.6, -0.1]), (), ["probs must lie in (0, 1]"]),
        (literal(probs=[0.5, 0.3, 0.1]), (), ["probs must sum to 1"]),
        (literal(token=7), (), ["token 7 is outside the vocabulary of size 5"]),
        (literal(old_prob=1.5), (), ["old_prob", "less than or equal to 1"]),
        (literal(old_prob=0.0), (), ["old_prob", "greater than 0"]),
        (literal(logits=[1.0, 2.0]), (), ["exactly one of logits and probs"]),
        ("seed: [1, 2\nlosses: x", (), ["not valid YAML"]),
        ("- just\n- a list\n", (), ["top level must be a mapping"]),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, config, args, expected):
    err = run_bad(tmp_path, config, *args)
    for text in expected:
        assert text in err, err


def test_every_problem_is_reported_at_once(tmp_path):
    err = run_bad(
        tmp_path,
        {
            "seed": "x",
            "loss": {"eps_high": -1, "typo": 1, "eps_low": "0.2", "dual_clip": True},
            "source": {"hidden_size": 0},
        },
    )  # a quoted number and a boolean where numbers go are among them, not the only ones
    assert "6 problem(s)" in err
    for path in (
        "seed", "loss.eps_high", "loss.typo", "loss.eps_low", "loss.dual_clip", "source.hidden_size"
    ):  # fmt: skip
        assert f"{path}:" in err


def test_literal_mode_rejects_mismatched_vocabularies(tmp_path):
    cfg = literal()
    cfg["source"]["sequences"].append({"positions": [{"probs": [0.5, 0.5], "token": 0}]})
    err = run_bad(tmp_path, cfg)
    assert "same vocabulary size" in err and "[2, 5]" in err


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["compare", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path):
    err = run_bad(tmp_path, None, "--device", "cuda")
    assert "no CUDA device" in err and "--device auto" in err


def test_debug_shows_the_exception():
    result = runner.invoke(app, ["compare", "--losses", "nope", "--debug"])
    assert result.exit_code != 0
    assert result.exception is not None and "unknown loss 'nope'" in str(result.exception)
