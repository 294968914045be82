"""The bad-input suite: every documented class of user error, through the CLI.

Each case runs one command as a user would and asserts exit status 2, one message on stderr that
names the field, key, option or file, no traceback, nothing on stdout, and no file left behind
anywhere under the case's directory. The classes are those of docs/cli.md's errors table, which
`test_the_errors_table_lists_every_class` holds equal to the cases here. Then every kind of OS
and encoding error a user can cause runs through every command that reads or writes files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gradlens.cli import app

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
LINUX = sys.platform.startswith("linux")
INVALID_UTF8 = b"seed: 1\nnote: '\xff\xfe'\n"
NOT_UTF8_PYTHON = b"x = '\xff'\n"


def good_batch() -> dict[str, torch.Tensor]:
    """A valid two-sequence batch file's tensors (V = 5, H = 4)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "responses": torch.tensor([[0, 1, 2], [3, 4, 0]]),
        "response_mask": torch.ones(2, 3, dtype=torch.long),
        "old_log_probs": -torch.rand(2, 3, generator=gen) - 0.1,
        "advantages": torch.tensor([1.0, -1.0]),
        "hidden_states": torch.randn(2, 3, 4, generator=gen),
        "lm_head_weight": torch.randn(5, 4, generator=gen),
    }


def batch_file(tmp: Path, name: str = "batch.pt", **changes: torch.Tensor | None) -> str:
    data = {**good_batch(), **changes}
    path = tmp / name
    torch.save({k: v for k, v in data.items() if v is not None}, path)
    return str(path)


def literal(**position: object) -> dict:
    pos = {"probs": [0.5, 0.3, 0.2], "token": 0, "advantage": 1.0, **position}
    return {"source": {"kind": "literal", "sequences": [{"positions": [pos]}]}}


def config_file(tmp: Path, data: dict | bytes | str) -> str:
    path = tmp / "config.yaml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def kept_sets(at: tuple[int, int, int] | None = None, value: int = 0) -> torch.Tensor:
    """[2, 3, 2] kept sets of `good_batch`'s tokens (each holds its sampled token; −1 pads), with
    the entry ``at`` set to ``value`` when given."""
    ids = torch.tensor([[[0, 3], [1, 2], [2, -1]], [[3, 4], [4, -1], [0, 2]]])
    if at is not None:
        ids[at] = value
    return ids


def replayed(d: Path, **changes: torch.Tensor) -> list[str]:
    """compare replaying the kept sets of a good batch with ``changes``."""
    path = batch_file(d, **{"kept_ids": kept_sets(), **changes})
    return ["compare", "--set", "loss.sampling_support=kept", "--set", f"source.path={path}"]


def pt_with(d: Path, **values: object) -> list[str]:
    """compare on a good batch saved as .pt with ``values`` (of any type) added."""
    path = d / "batch.pt"
    torch.save({**good_batch(), **values}, path)
    return ["compare", "--set", f"source.path={path}"]


def jsonl_batch(path: Path, lines: bytes) -> list[str]:
    """compare on a .jsonl batch file of these ``lines``."""
    path.write_bytes(lines)
    return ["compare", "--set", f"source.path={path}"]


@dataclass(frozen=True)
class Case:
    """One user error: the class of docs/cli.md's table, the command line (built in the case's
    directory) and the words the message must hold."""

    kind: str
    argv: Callable[[Path], list[str]]
    expected: tuple[str, ...]


CASES = {
    # a config file that cannot be read as one
    "config-missing": Case(
        "config-file", lambda d: ["compare", "-c", str(d / "nope.yaml")], ("nope.yaml",)
    ),
    "config-not-utf8": Case(
        "config-file",
        lambda d: ["compare", "-c", config_file(d, INVALID_UTF8)],
        ("config.yaml", "not UTF-8", "0xff"),
    ),
    "config-not-yaml": Case(
        "config-file",
        lambda d: ["compare", "-c", config_file(d, "seed: [1, 2\n")],
        ("config.yaml", "not valid YAML: line 2, column 1: expected ',' or ']'", "at line 1"),
    ),
    "config-not-mapping": Case(
        "config-file",
        lambda d: ["compare", "-c", config_file(d, "- a\n- b\n")],
        ("top level must be a mapping",),
    ),
    "config-key-twice": Case(
        "config-file",
        lambda d: [
            "compare",
            "-c",
            config_file(d, "loss:\n  eps_high: 0.3\nloss:\n  eps_low: 0.1\n"),
        ],
        ("found the key 'loss' a second time (first on line 1)",),
    ),
    "override-key-twice": Case(
        "override",
        lambda d: ["compare", "--set", "loss={eps_low: 0.1, eps_low: 0.2}"],
        ("--set", "found the key 'eps_low' a second time"),
    ),
    # values of the configuration
    "config-unknown-key": Case(
        "config-value",
        lambda d: ["compare", "--set", "loss.cliprange=0.2"],
        ("loss.cliprange", "unknown key", "eps_high"),
    ),
    "config-out-of-range": Case(
        "config-value",
        lambda d: ["compare", "--set", "source.vocab_size=1"],
        ("source.vocab_size", "greater than or equal to 2"),
    ),
    "config-not-finite": Case(
        "config-value",
        lambda d: ["compare", "--set", "loss.eps_high=.nan"],
        ("loss.eps_high", "finite"),
    ),
    "config-seed-beyond-64-bits": Case(
        "config-value",
        lambda d: ["compare", "--set", f"seed={2**64}"],
        ("seed", "less than 18446744073709551616"),
    ),
    "config-beyond-float32": Case(
        "config-value",
        lambda d: ["compare", "-l", "ppo_clip", "--set", "loss.eps_high=1e39"],
        ("loss.eps_high: 1e+39 is beyond float32's range", "dtype float64"),
    ),
    "output-same-file-twice": Case(
        "output-file",
        lambda d: ["sweep", "--output", str(d / "x.png"), "-f", "json", "--plot", str(d / "x.png")],
        ("--output and --plot both name", "x.png", "its own file"),
    ),
    "plots-same-file-twice": Case(
        "output-file",
        lambda d: ["compare", "--plot", str(d / "p.png"), "--plot-mismatch", str(d / "p.png")],
        ("--plot and --plot-mismatch both name", "p.png"),
    ),
    "sweep-over-key-twice": Case(
        "sweep-settings",
        lambda d: ["sweep", "--over", "loss.eps_high=0.2,0.3", "--over", "loss.eps_high=0.4"],
        ("loss.eps_high is already swept by --over 'loss.eps_high=0.2,0.3'",),
    ),
    "sweep-over-value-twice": Case(
        "sweep-settings",
        lambda d: ["sweep", "--over", "loss.eps_high=0.2,0.2"],
        ("0.2 is given twice",),
    ),
    "config-unknown-loss": Case(
        "config-value",
        lambda d: ["compare", "--losses", "ppo_clp"],
        ("unknown loss 'ppo_clp'", "did you mean 'ppo_clip'"),
    ),
    "literal-nan-advantage": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(advantage=float("nan")))],
        ("source.sequences[0].positions[0].advantage", "finite"),
    ),
    "literal-token-outside": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(token=7))],
        ("source.sequences[0].positions[0]", "token 7 is outside the vocabulary of size 3"),
    ),
    "literal-fractional-token": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(token=1.5))],
        ("source.sequences[0].positions[0].token", "integer"),
    ),
    "literal-defaulted-rollout-blames-its-source": Case(
        "config-value",
        lambda d: [
            "compare",
            "-c",
            config_file(
                d,
                {
                    "source": {
                        "kind": "literal",
                        "sequences": [
                            {
                                "positions": [
                                    {
                                        "logits": [0, 0],
                                        "token": 0,
                                        "advantage": 1,
                                        "rollout_prob": 0.5,
                                    },
                                    {"logits": [3e38, -3e38], "token": 1, "advantage": -1},
                                ]
                            }
                        ],
                    }
                },
            ),
        ],  # position 1 states no rollout_prob: its default, π_old(y), is what overflows
        ("positions[1].logits (π_old(y), which rollout_prob defaults to): -inf",),
    ),
    "literal-boolean-token": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(token=True))],  # not token 1
        ("source.sequences[0].positions[0].token", "an integer, not a boolean (got true)"),
    ),
    "literal-boolean-probability": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(probs=[0.5, True, 0.2]))],
        ("positions[0].probs", "not a boolean (got [0.5, true, 0.2])"),
    ),
    "config-boolean-seed": Case(
        "config-value", lambda d: ["compare", "--set", "seed=true"], ("seed", "not a boolean")
    ),
    "config-string-seed": Case(
        "config-value",  # pydantic would read the quoted '5' as 5
        lambda d: ["compare", "--set", "seed='5'"],
        ("seed", "an integer, not a string (got '5')"),
    ),
    "config-string-probability": Case(
        "config-value",
        lambda d: ["compare", "-c", config_file(d, literal(probs=[0.5, "0.3", 0.2]))],
        ("positions[0].probs", "not a string"),
    ),
    "config-negative-seed": Case(
        "config-value",  # torch reads −1 as 2⁶⁴ − 1: two seeds, one batch
        lambda d: ["compare", "--set", "seed=-1"],
        ("seed", "greater than or equal to 0"),
    ),
    "losses-settings-without-compare": Case(
        "override",
        lambda d: ["losses", "--set", "loss.eps_high=0.4"],  # would have been ignored
        ("--set gives the loss settings of --compare A,B",),
    ),
    "losses-compare-non-loss-setting": Case(
        "override",
        lambda d: ["losses", "--compare", "ppo,ppo_clip", "--set", "seed=3"],
        ("--set 'seed=3'", "loss settings (loss.*) alone"),
    ),
    # --set itself
    "override-no-value": Case(
        "override", lambda d: ["compare", "--set", "eps_high"], ("eps_high",)
    ),
    "override-through-value": Case(
        "override",
        lambda d: ["compare", "-c", config_file(d, {"seed": 1}), "--set", "seed.x=1"],
        ("seed is a value, not a section",),
    ),
    # a user loss
    "user-loss-missing-module": Case(
        "user-loss",
        lambda d: ["compare", "--losses", "no_such_module_xyz:fn"],
        ("no_such_module_xyz", "not found"),
    ),
    "user-loss-not-utf8": Case(
        "user-loss",
        lambda d: ["compare", "--losses", f"{write(d / 'loss.py', NOT_UTF8_PYTHON)}:fn"],
        ("loss.py", "utf-8"),
    ),
    # the structure of a batch file
    "batch-missing-file": Case(
        "batch-file",
        lambda d: ["compare", "--set", f"source.path={d / 'absent.pt'}"],
        ("source.path", "absent.pt"),
    ),
    "batch-unknown-format": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            "source.kind=batch",
            "--set",
            f"source.path={write(d / 'b.npz', b'x')}",
        ],
        ("source.path", "unknown format '.npz'"),
    ),
    "batch-missing-key": Case(
        "batch-file",
        lambda d: ["compare", "--set", f"source.path={batch_file(d, old_log_probs=None)}"],
        ("source.path", "'old_log_probs'"),
    ),
    "batch-wrong-shape": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, old_log_probs=torch.zeros(2, 4))}",
        ],
        ("'old_log_probs' has shape (2, 4)",),
    ),
    "batch-not-utf8": Case(
        "batch-file",
        lambda d: ["compare", "--set", f"source.path={write(d / 'b.jsonl', INVALID_UTF8)}"],
        ("source.path", "b.jsonl", "not UTF-8"),
    ),
    # the values of a batch file
    "batch-nan-advantage": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, advantages=torch.tensor([1.0, float('nan')]))}",
        ],
        ("'advantages'[1]", "NaN"),
    ),
    "batch-inf-hidden": Case(
        "batch-values",
        lambda d: ["compare", "--set", f"source.path={batch_file(d, hidden_states=inf_at())}"],
        ("'hidden_states'[1, 2, 3]", "+inf"),
    ),
    "batch-positive-logp": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, old_log_probs=torch.full((2, 3), 0.25))}",
        ],
        ("'old_log_probs'[0, 0]", "0.25 > 0"),
    ),
    "batch-token-outside": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, responses=torch.tensor([[0, 1, 2], [3, 9, 0]]))}",
        ],
        ("'responses'[1, 1]", "token id 9", "[0, 5)"),
    ),
    "batch-fractional-token": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, responses=torch.tensor([[0.0, 1.5, 2], [3, 4, 0]]))}",
        ],
        ("'responses'[0, 1]", "1.5", "not a whole number"),
    ),
    "batch-no-sequences": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            "source.path="
            + batch_file(
                d,
                responses=torch.zeros(0, 3, dtype=torch.long),
                response_mask=None,
                old_log_probs=None,
                advantages=None,
                hidden_states=None,
                lm_head_weight=None,
            ),
        ],
        ("'responses' has shape (0, 3)", "at least one sequence"),
    ),
    "batch-sparse-tensor": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, advantages=torch.tensor([1.0, -1.0]).to_sparse())}",
        ],
        ("'advantages'", "sparse_coo", "dense"),
    ),
    "batch-meta-tensor": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, hidden_states=torch.empty(2, 3, 4, device='meta'))}",
        ],
        ("'hidden_states'", "meta device", "no values"),
    ),
    "batch-complex-values": Case(
        "batch-file",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, advantages=torch.tensor([1.0, -1.0]) + 0j)}",
        ],
        ("'advantages'", "complex", "real numbers"),
    ),
    "batch-not-a-tensor": Case(
        "batch-file",
        lambda d: ["compare", "--set", f"source.path={batch_file(d, responses=[[0, 1, 2]])}"],
        ("'responses'", "holds a list, not a tensor"),
    ),
    "batch-one-token-vocabulary": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            "source.path="
            + batch_file(
                d, responses=torch.zeros(2, 3, dtype=torch.long), lm_head_weight=torch.ones(1, 4)
            ),
        ],
        ("'lm_head_weight'", "vocabulary of 1 row", "fewer than 2 tokens"),
    ),
    "batch-hidden-size-zero": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            "source.path="
            + batch_file(d, hidden_states=torch.zeros(2, 3, 0), lm_head_weight=torch.zeros(5, 0)),
        ],
        ("'hidden_states' has shape (2, 3, 0)", "at least 1"),
    ),
    "batch-negative-stale-steps": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, stale_steps=torch.tensor([2, -3]))}",
        ],
        ("'stale_steps'[1] is -3", "≥ 0"),
    ),
    "batch-tokenizer-digest-of-31-bytes": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, tokenizer_sha256=torch.zeros(31, dtype=torch.uint8))}",
        ],
        ("'tokenizer_sha256' has shape (31,)", "expected [32]", "32 bytes"),
    ),
    "batch-tokenizer-digest-byte-of-256": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, tokenizer_sha256=torch.arange(32) * 8 + 8)}",
        ],
        ("'tokenizer_sha256'[31] is 256", "from 0 to 255"),
    ),
    "batch-boolean-token-ids": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, responses=torch.ones(2, 3, dtype=torch.bool))}",
        ],
        ("'responses' holds booleans", "token ids are integers"),
    ),
    "batch-kept-id-twice": Case(
        "batch-values",
        lambda d: replayed(d, kept_ids=kept_sets(at=(0, 1, 1), value=1)),
        ("'kept_ids'[0, 1, 1] is 1", "lists each token once"),
    ),
    "batch-token-outside-its-kept-set": Case(
        "batch-values",
        lambda d: replayed(d, kept_ids=kept_sets(at=(0, 0, 0), value=4)),  # K = {4, 3}, y = 0
        ("'responses'[0, 0] is 0, not in its kept set 'kept_ids'[0, 0] = [4, 3]",),
    ),
    "batch-token-outside-its-kept-set-unreplayed": Case(  # refused whether replayed or not
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, kept_ids=kept_sets((0, 0, 0), 4))}",
        ],
        ("'responses'[0, 0] is 0, not in its kept set",),
    ),
    "batch-kept-mass-above-zero": Case(
        "batch-values",
        lambda d: replayed(
            d, old_log_kept_mass=torch.tensor([[-0.1, 5.0, -0.2], [-0.1, -0.1, -0.1]])
        ),
        ("'old_log_kept_mass'[0, 1] is 5", "finite and ≤ 0"),
    ),
    "batch-jsonl-ragged-line": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "ragged.jsonl",
            b'{"responses": [0, 1, 2], "response_mask": [1, 1, 1], '
            b'"old_log_probs": [-0.5, -0.5], "advantages": 1.0}\n',
        ),
        ("line 1 of ragged.jsonl", "'old_log_probs' has 2 entries and 'responses' 3"),
    ),
    "batch-jsonl-boolean-token-id": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "bool.jsonl",
            b'{"responses": [0, true], "response_mask": [true, true], '
            b'"old_log_probs": [-0.5, -0.5], "advantages": 1.0}\n',
        ),  # the mask's booleans are fine; the id's would become token 1
        ("line 1 of bool.jsonl", "'responses'[1] is the boolean true", "only the masks"),
    ),
    "batch-pt-value-not-a-tensor": Case(
        "batch-file",
        lambda d: pt_with(d, rollout_log_probs=[[-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5]]),
        ("'rollout_log_probs' in batch.pt holds a list, not a tensor",),
    ),
    "batch-boolean-log-probs": Case(
        "batch-file",
        lambda d: pt_with(d, old_log_probs=torch.zeros(2, 3, dtype=torch.bool)),
        ("'old_log_probs' holds booleans", "only the masks"),
    ),
    "batch-boolean-advantages": Case(
        "batch-file",
        lambda d: pt_with(d, advantages=torch.tensor([True, False])),
        ("'advantages' holds booleans", "'advantages' takes numbers"),
    ),
    "batch-boolean-shard-key": Case(
        "batch-file",
        lambda d: pt_with(d, vocab_offset=torch.tensor(False), vocab_size=torch.tensor(5)),
        ("'vocab_offset' holds booleans", "one integer, a row number"),
    ),
    "batch-jsonl-key-twice": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "twice.jsonl",
            b'{"responses": [0], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": 1.0, "advantages": 0.0}\n',
        ),
        ("line 1 of twice.jsonl gives the key 'advantages' twice",),
    ),
    "batch-jsonl-key-after-line-1": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "later.jsonl",
            b'{"responses": [0], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": 1.0}\n'
            b'{"responses": [1], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": -1.0, "rollout_log_probs": [NaN]}\n',
        ),  # read from line 1's keys alone, the NaN passed unseen
        ("line 2 of later.jsonl gives 'rollout_log_probs'", "on line 1"),
    ),
    "batch-jsonl-lm-head-after-line-1": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "head.jsonl",
            b'{"responses": [0], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": 1.0, "hidden_states": [[0.1]], "lm_head_weight": [[1.0], [2.0]]}\n'
            b'{"responses": [1], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": -1.0, "hidden_states": [[0.3]], "lm_head_weight": [[9.0], [9.0]]}\n',
        ),
        ("line 2 of head.jsonl gives 'lm_head_weight'", "line 1 alone"),
    ),
    "batch-jsonl-hidden-size-differs": Case(
        "batch-file",
        lambda d: jsonl_batch(
            d / "wide.jsonl",
            b'{"responses": [0], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": 1.0, "hidden_states": [[0.1, 0.2]], '
            b'"lm_head_weight": [[1.0, 0.0], [0.0, 1.0]]}\n'
            b'{"responses": [1], "response_mask": [1], "old_log_probs": [-0.5], '
            b'"advantages": -1.0, "hidden_states": [[0.3]]}\n',
        ),
        ("'hidden_states' in wide.jsonl", "line 2 has entries of shape (1,)", "(2,)"),
    ),
    "batch-mask-not-binary": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d, response_mask=torch.tensor([[1, 1, 2], [1, 0, 0]]))}",
        ],
        ("'response_mask'[0, 2]", "0 (not in the loss) or 1"),
    ),
    "batch-nan-reward": Case(
        "batch-values",
        lambda d: [
            "compare",
            "--set",
            "source.path="
            + batch_file(d, advantages=None, rewards=torch.tensor([1.0, float("inf")])),
        ],
        ("'rewards'[1]", "+inf"),
    ),
    # synthetic settings the dtype cannot hold
    "synthetic-drift-overflow": Case(
        "synthetic-settings",
        lambda d: ["compare", "--set", "source.drift.scale=1e300"],
        ("source.drift.scale", "overflow float32"),
    ),
    "synthetic-temperature-overflow": Case(
        "synthetic-settings",
        lambda d: ["compare", "--set", "source.entropy=null", "--set", "source.temperature=1e-40"],
        ("source.temperature", "overflow float32"),
    ),
    # a checkpoint
    "checkpoint-not-a-directory": Case(
        "checkpoint",
        lambda d: ["compare", "--source", "model", "--set", f"source.path={d / 'ckpt'}"],
        ("source.path", "is not a local directory"),
    ),
    "checkpoint-hub-id": Case(
        "checkpoint",
        lambda d: ["compare", "--source", "model", "--set", "source.path=someorg/somemodel"],
        ("source.path", "Hugging Face Hub id"),
    ),
    # a reward function
    "reward-unknown": Case(
        "reward",
        lambda d: ["compare", "--source", "model", "--set", "source.reward=python_sintax"],
        ("source.reward", "did you mean 'python_syntax'"),
    ),
    # settings that need an input the source will not have
    "corrections-without-rollout": Case(
        "missing-input",
        lambda d: ["compare", "--set", "loss.corrections=[{kind: icepop}]"],
        ("loss.corrections (icepop)", "rollout log-probs", "source.rollout_drift"),
    ),
    "corrections-without-rollout-in-file": Case(
        "missing-input",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d)}",
            "--set",
            "loss.corrections=[{kind: token_tis}]",
        ],
        ("loss.corrections (token_tis)", "'rollout_log_probs'"),
    ),
    # memory
    "memory-vocabulary": Case(
        "memory",
        lambda d: ["compare", "--set", "source.vocab_size=4000000000"],
        ("source.vocab_size", "needs about", "TB", "available"),
    ),
    "memory-sequences": Case(
        "memory",
        lambda d: [
            "dump",
            "-o",
            str(d / "out" / "b.pt"),
            "--set",
            "source.num_sequences=1000000000",
        ],
        ("source.num_sequences", "needs about", "available"),
    ),
    # output files, before any work
    "output-unknown-suffix": Case(
        "output-file", lambda d: ["dump", "-o", str(d / "b.txt")], ("--output", "unknown format")
    ),
    "output-is-a-directory": Case(
        "output-file", lambda d: ["dump", "-o", str(mkdir(d / "b.pt"))], ("b.pt",)
    ),
    "output-directory-without-suffix": Case(
        "output-file",
        lambda d: ["dump", "-o", str(mkdir(d / "out"))],
        ("--output", "is a directory"),  # not "unknown format": the directory is the problem
    ),
    "plot-directory-without-suffix": Case(
        "output-file",
        lambda d: ["sweep", "--plot", str(mkdir(d / "out"))],
        ("--plot", "is a directory"),
    ),
    "output-ends-in-a-separator": Case(
        "output-file",
        lambda d: ["dump", "-o", f"{d / 'b.pt'}/"],  # a Path would drop the '/' and write b.pt
        ("--output", "b.pt/", "names a directory"),
    ),
    "output-empty": Case(
        "output-file", lambda d: ["dump", "-o", ""], ("--output", "the file name is empty")
    ),
    "plot-ends-in-a-separator": Case(
        "output-file",
        lambda d: ["compare", "--plot-mismatch", f"{d / 'm.png'}/"],
        ("--plot-mismatch", "m.png/", "names a directory"),
    ),
    "trace-plot-ends-in-a-separator": Case(
        "output-file",
        lambda d: ["trace", str(d), "--plot", f"{d / 't.png'}/"],
        ("--plot", "t.png/", "names a directory"),
    ),
    "output-under-a-file": Case(
        "output-file",
        lambda d: ["dump", "-o", str(write(d / "f", b"x") / "b.pt")],
        ("--output", "is a file"),
    ),
    "sweep-output-under-a-file": Case(
        "output-file",
        lambda d: ["sweep", "--output", str(write(d / "f", b"x") / "s.csv")],
        ("--output", "is a file"),
    ),
    "plot-under-a-file": Case(
        "output-file",
        lambda d: ["sweep", "--plot", str(write(d / "f", b"x") / "s.png")],
        ("--plot", "is a file"),
    ),
    "plot-unknown-suffix": Case(
        "output-file", lambda d: ["sweep", "--plot", str(d / "s.gif")], ("--plot", ".png")
    ),
    "compare-plot-under-a-file": Case(
        "output-file",
        lambda d: ["compare", "--plot", str(write(d / "f", b"x") / "a.png")],
        ("--plot", "is a file"),
    ),
    "compare-plot-unknown-suffix": Case(
        "output-file", lambda d: ["compare", "--plot", str(d / "a.gif")], ("--plot", ".png")
    ),
    # what the attribution cannot do
    "plot-attribution-off": Case(
        "attribution",
        lambda d: ["compare", "--plot", str(d / "a.png"), "--set", "diagnostics.attribution=off"],
        ("--plot", "diagnostics.attribution is 'off'"),
    ),
    "plot-parity-matrix": Case(
        "attribution",
        lambda d: [
            "compare",
            "--parity",
            "ppo,ppo_clip",
            "--parity-matrix",
            "loss.eps_high=[0.2, 0.3]",
            "--plot",
            str(d / "a.png"),
        ],
        ("--plot", "--parity-matrix"),
    ),
    "attribution-on-fused": Case(
        "attribution",
        lambda d: [
            "compare",
            "--set",
            "diagnostics.engine=fused",
            "--set",
            "diagnostics.attribution=on",
        ],
        ("diagnostics", "attribution 'on' needs the materialized or streamed engine"),
    ),
    "tokenizer-missing": Case(
        "attribution",
        lambda d: [
            "compare",
            "--set",
            f"source.path={batch_file(d)}",
            "--set",
            f"source.tokenizer={d / 'none'}",
        ],
        ("source.tokenizer", "does not exist"),
    ),
    # the sweep's own settings
    "sweep-bad-axis": Case("sweep-settings", lambda d: ["sweep", "--min", "2"], ("pi_old.min",)),
    "sweep-output-without-format": Case(
        "sweep-settings",
        lambda d: ["sweep", "--output", str(d / "s.txt")],
        ("--output", "--format json|jsonl|csv|summary"),
    ),
    # --parity
    "parity-one-loss": Case("parity", lambda d: ["compare", "--parity", "ppo"], ("--parity",)),
    "parity-matrix-without-pair": Case(
        "parity",
        lambda d: ["compare", "--parity-matrix", "loss.eps_high=[0.2, 0.3]"],
        ("--parity-matrix", "--parity A,B"),
    ),
    "parity-matrix-not-a-list": Case(
        "parity",
        lambda d: ["compare", "--parity", "ppo,ppo_clip", "--parity-matrix", "loss.eps_high=0.3"],
        ("--parity-matrix 'loss.eps_high=0.3'", "YAML list"),
    ),
    "parity-loss-against-itself": Case(
        "parity", lambda d: ["compare", "--parity", "ppo,ppo"], ("a loss against itself",)
    ),
    "parity-pair-twice": Case(
        "parity",
        lambda d: ["compare", "--parity", "ppo,ppo_clip", "--parity", "ppo,ppo_clip"],
        ("this pair is given twice",),
    ),
    "parity-matrix-value-twice": Case(
        "parity",
        lambda d: [
            "compare",
            "--parity",
            "ppo,ppo_clip",
            "--parity-matrix",
            "loss.eps_high=[0.1, 0.1]",
        ],
        ("0.1 is given twice",),
    ),
    "parity-matrix-over-the-pairs": Case(
        "parity",
        lambda d: ["compare", "--parity", "ppo,ppo_clip", "--parity-matrix", "parity.pairs=[null]"],
        ("the pairs themselves are --parity A,B",),
    ),
    "parity-matrix-no-value": Case(
        "parity",
        lambda d: ["compare", "--parity", "ppo,ppo_clip", "--parity-matrix", "eps_high"],
        ("--parity-matrix 'eps_high'", "key=value"),
    ),
    # the frameworks' own losses
    "framework-unknown-loss": Case(
        "framework",
        lambda d: ["compare", "--losses", "verl:vanila"],
        ("verl:vanila", "verl has no loss 'vanila'", "vanilla"),
    ),
    # tensor parallelism
    "tensor-parallel-without-torchrun": Case(
        "tensor-parallel",
        lambda d: ["compare", "--tensor-parallel", "2"],
        ("--tensor-parallel 2", "torchrun --nproc-per-node 2"),
    ),
}


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def inf_at() -> torch.Tensor:
    h = good_batch()["hidden_states"].clone()
    h[1, 2, 3] = float("inf")
    return h


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_bad(argv: list[str], root: Path) -> str:
    """Run a command that must fail as bad input; its stderr. No file may appear under
    ``root`` (beyond what existed before the command)."""
    before = files(root)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert result.stdout == ""
    assert files(root) == before, files(root) - before
    return result.stderr


# Cases known only after a whole run (or a framework import): seconds each, slow.
SLOW_CASES = {"synthetic-drift-overflow", "plot-streamed-auto", "framework-unknown-loss"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CASES else []) for n in sorted(CASES)],
)
def test_every_documented_error_is_exit_2_with_its_field(tmp_path, name):
    case = CASES[name]
    argv = case.argv(tmp_path)  # the case's input files are written here, before the run
    err = run_bad(argv, tmp_path)
    for text in case.expected:
        assert text in err, (text, err)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "argv",
    [
        ["dump", "-o", "/proc/gradlens-out.pt"],
        ["sweep", "--output", "/proc/gradlens-out.csv"],
        ["sweep", "--plot", "/proc/gradlens-out.png"],
    ],
)
def test_a_folder_where_no_file_can_be_created_is_refused_before_any_work(tmp_path, argv):
    # /proc's permission bits allow root to write, but the kernel creates no file there: the
    # check tries, and says so before a batch is built or a sweep computed
    err = run_bad(argv, tmp_path)
    assert argv[-1] in err and "no file can be created in '/proc'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_cuda(tmp_path):
    err = run_bad(["compare", "--device", "cuda"], tmp_path)
    assert "device" in err and "no CUDA device" in err


@pytest.mark.slow
def test_stdout_that_cannot_be_written_is_exit_2():
    """A full disk where stdout is redirected: Linux's /dev/full, a real ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    for command in (["schema"], ["config"], ["losses"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [sys.executable, "-m", "gradlens", *command],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=600,
            )
        assert done.returncode == 2, (command, done.stderr)
        assert "stdout: No space left on device" in done.stderr
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_a_framework_that_is_not_installed_names_the_install_line(tmp_path, monkeypatch):
    # whether or not TRL is installed here, the registry is told it is not
    import gradlens.losses.frameworks.base as framework_base

    monkeypatch.setattr(framework_base, "installed_version", lambda distribution: None)
    err = run_bad(["compare", "--losses", "trl:grpo"], tmp_path)
    assert "trl:grpo" in err and "is not installed" in err and "pip install" in err


DOCUMENTED = {"device", "stdout"}  # classes run by the tests above (framework has a case too)


def test_the_errors_table_lists_every_class():
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("| class | examples") :].split("\n\n")[0]
    classes = set(re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M))
    assert classes == {c.kind for c in CASES.values()} | DOCUMENTED


# ----------------------------------------------------------------------------- OS and encoding
# Every command that reads a file, with each kind of error a user can cause: missing, a
# directory, unreadable (no permission; an I/O error), not UTF-8.


def reading_commands(path: str) -> dict[str, list[str]]:
    return {
        "compare --config": ["compare", "-c", path],
        "sweep --config": ["sweep", "-c", path],
        "dump --config": ["dump", "-o", str(Path(path).parent / "out.pt"), "-c", path],
        "config --config": ["config", "-c", path],
    }


def batch_commands(path: str) -> dict[str, list[str]]:
    out = str(Path(path).parent / "out.pt")
    return {
        "compare source.path": [
            "compare",
            "--set",
            "source.kind=batch",
            "--set",
            f"source.path={path}",
        ],
        "dump source.path": [
            "dump",
            "-o",
            out,
            "--set",
            "source.kind=batch",
            "--set",
            f"source.path={path}",
        ],
    }


def loss_commands(path: str) -> dict[str, list[str]]:
    return {
        "compare --losses": ["compare", "--losses", f"{path}:fn"],
        "sweep --losses": ["sweep", "--losses", f"{path}:fn"],
    }


def unreadable(tmp: Path, name: str, kind: str) -> Path | None:
    """A file ``name`` under ``tmp`` that cannot be read for the reason ``kind``, or None when
    this machine cannot make one."""
    path = tmp / name
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "not-utf8":
        path.write_bytes(INVALID_UTF8)
        return path
    if kind == "no-permission":
        if ROOT:
            return None  # root reads every file whatever its mode
        path.write_text("seed: 1\n")
        path.chmod(0)
        return path
    if kind == "name-too-long":  # longer than a file system's 255 bytes: ENAMETOOLONG
        return tmp / ("b" * 300 + name)
    if kind == "endless":  # a device that never ends: refused before it fills the memory
        if not Path("/dev/zero").exists():
            return None
        path.symlink_to("/dev/zero")
        return path
    if kind == "io-error":  # a file whose read fails in the kernel (EIO), even for root
        if not LINUX or not Path("/proc/self/mem").exists():
            return None
        path.symlink_to("/proc/self/mem")
        return path
    raise AssertionError(kind)


READ_ERRORS = (
    "missing", "directory", "no-permission", "io-error", "not-utf8", "endless", "name-too-long"
)  # fmt: skip


@pytest.mark.parametrize("kind", READ_ERRORS)
def test_every_command_that_reads_a_file_refuses_an_unreadable_one(tmp_path, kind):
    groups = (
        ("config.yaml", reading_commands),
        ("batch.jsonl", batch_commands),
        ("batch.safetensors", batch_commands),
        ("loss.py", loss_commands),
    )
    ran = 0
    for name, commands in groups:
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        path = unreadable(folder, name, kind)
        if path is None:
            continue
        for label, argv in commands(str(path)).items():
            err = run_bad(argv, tmp_path)
            assert name in err, (label, err)
            ran += 1
    if not ran:
        pytest.skip(f"this machine cannot make a file that fails with {kind}")


# Every command that writes a file, with each kind of error a user can cause.


def writing_commands(path: Path) -> list[list[str]]:
    suffix = {"dump": ".jsonl", "sweep --output": ".csv", "sweep --plot": ".png"}
    return [
        ["dump", "-o", str(path.with_suffix(suffix["dump"])), "--set", "source.num_sequences=4"],
        ["dump", "-o", str(path.with_suffix(".safetensors")), "--set", "source.num_sequences=4"],
        ["dump", "-o", str(path.with_suffix(".pt")), "--set", "source.num_sequences=4"],
        ["sweep", "--points", "5", "--output", str(path.with_suffix(suffix["sweep --output"]))],
        ["sweep", "--points", "5", "--plot", str(path.with_suffix(suffix["sweep --plot"]))],
        [
            "compare",
            "-l",
            "reinforce",
            "--set",
            "source.num_sequences=4",
            "--plot",
            str(path.with_suffix(".pdf")),
        ],
    ]


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path):
    for argv in writing_commands(tmp_path / ("b" * 300)):
        err = run_bad(argv, tmp_path)
        named = next(a for a in argv if "b" * 300 in a)
        assert "File name too long" in err and named in err, err


@pytest.mark.slow
def test_a_full_disk_is_exit_2_for_every_output(tmp_path):
    """Each output written to a link to /dev/full: a real ENOSPC midway through the write."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    for argv in writing_commands(tmp_path / "out"):
        target = Path(argv[argv.index("-o") + 1] if "-o" in argv else argv[-1])
        target.symlink_to("/dev/full")
        before = files(tmp_path)
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "No space left on device" in result.stderr and "Traceback" not in result.output
        assert files(tmp_path) == before  # no temporary file left beside the link
        target.unlink()


def test_a_directory_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    import gradlens.sources as sources
    import gradlens.sweep.run as sweep_run

    def never(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(sources, "build_source", never)
    monkeypatch.setattr(sweep_run, "run_sweep", never)
    monkeypatch.setattr("gradlens.sweep.run_sweep", never)
    outputs = [tmp_path / "f" / "deeper"]  # under a file: for anyone, root included
    (tmp_path / "f").write_bytes(b"x")
    if not ROOT:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        outputs.append(locked / "new")
    for base in outputs:
        for argv in writing_commands(base / "out"):
            err = run_bad(argv, tmp_path)
            assert str(base.parent) in err or str(base) in err, err


@pytest.mark.slow
def test_an_os_error_midway_through_a_write_leaves_nothing(tmp_path, monkeypatch):
    """No permission, a read-only file system: injected where the bytes are written, since
    root ignores permissions; the created parent directories are removed again."""
    import errno

    import gradlens.files as files_module

    for code in (errno.EACCES, errno.EROFS, errno.ENOSPC):

        def failing_open(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(files_module, "open", failing_open, raising=False)
        for argv in writing_commands(tmp_path / "new" / "dirs" / "out"):
            err = run_bad(argv, tmp_path)
            assert os.strerror(code) in err, err
            assert not (tmp_path / "new").exists()
        monkeypatch.undo()


@pytest.mark.slow
def test_every_output_creates_missing_parent_directories(tmp_path):
    for i in range(len(writing_commands(tmp_path))):
        argv = writing_commands(tmp_path / "a" / f"d{i}" / "out")[i]
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
        written = Path(argv[argv.index("-o") + 1] if "-o" in argv else argv[-1])
        assert written.is_file() and written.stat().st_size > 0
        assert sorted(p.name for p in written.parent.iterdir()) == [written.name]


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
    ],
)
def test_an_allocation_that_fails_beyond_the_estimates_is_exit_2(tmp_path, monkeypatch, error):
    import dataclasses

    import gradlens.sources as sources

    def allocate(*args, **kwargs):
        raise error

    entry = sources.SOURCES["synthetic"]
    monkeypatch.setitem(sources.SOURCES, "synthetic", dataclasses.replace(entry, build=allocate))
    err = run_bad(["compare"], tmp_path)
    assert "out of memory" in err and "make the batch smaller" in err


def test_a_real_bug_is_still_exit_3(monkeypatch):
    import dataclasses

    import gradlens.sources as sources

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    entry = sources.SOURCES["synthetic"]
    monkeypatch.setitem(sources.SOURCES, "synthetic", dataclasses.replace(entry, build=bug))
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 3 and "This is a bug in gradlens" in result.stderr
