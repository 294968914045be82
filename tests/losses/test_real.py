"""REAL (docs/losses.md §2.24): classification within each prompt group, the one group-coupled
loss, and the prompt groups every source gives it (``Batch.groups``).

Hand-computed cases run from the literal configs shipped in ``configs/`` through the CLI's JSON
report (``gradlens compare -c ... -f json --check``); the arithmetic is in each config's header
and repeated here where it is asserted. Setting, unless a config says otherwise: V = 5,
π = [0.5, 0.2, 0.15, 0.1, 0.05], y = 0 (π_θ(y) = 0.5), aggregation weight 1 per token, so
∂L/∂z = g·(e_0 − π) with e_0 − π = [0.5, −0.2, −0.15, −0.1, −0.05].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    ABS,
    build_batch,
    cli_report,
    coefficients,
    invoke,
    loss_json,
    scaled,
    token_grad,
)

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.errors import GradlensError


def test_tc25_real_group_classification() -> None:
    report = cli_report("literal_tc25_real.yaml")
    # c(seq 0) = (1/2)·(−2·0.25/1.25) = −0.2; c(seq 1) = (1/4)·(2·1/2) = 0.25 per token; group 1
    # has no O⁻ member: skipped
    assert coefficients(report, "real") == pytest.approx([-0.2, 0.25, 0.25, 0.0], abs=ABS)
    assert token_grad(report, "real", 0) == pytest.approx(scaled(-0.2), abs=ABS)
    assert token_grad(report, "real", 1) == pytest.approx(scaled(0.25), abs=ABS)
    r = loss_json(report, "real")
    assert r["loss"] == pytest.approx((math.log(2) + math.log(1.25)) / 2, abs=ABS)  # 0.458145
    assert r["clipping"]["sequence_shares"]["seq_group_skipped"] == pytest.approx(1 / 3)
    # REAL normalises itself: another aggregation changes nothing
    other = cli_report("literal_tc25_real.yaml", "loss.aggregation=seq_mean_token_sum")
    assert coefficients(other, "real") == pytest.approx([-0.2, 0.25, 0.25, 0.0], abs=ABS)


def test_real_needs_groups_and_says_which_settings_give_them() -> None:
    config = validate(
        {
            "losses": ["real"],
            "dtype": "float64",
            "source": {
                "kind": "literal",
                "sequences": [{"positions": [{"probs": [0.5, 0.5], "token": 0}]}],
            },
        }
    )
    with pytest.raises(GradlensError, match=r"real is group-coupled.*group_size"):
        run_compare(config)
    with pytest.raises(GradlensError, match="state group on every sequence or on none"):
        validate(
            {
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {"group": 0, "positions": [{"probs": [0.5, 0.5], "token": 0}]},
                        {"positions": [{"probs": [0.5, 0.5], "token": 0}]},
                    ],
                }
            }
        )


def test_synthetic_batches_carry_their_prompt_groups() -> None:
    batch = build_batch(
        validate({"source": {"num_sequences": 8, "group_size": 4, "vocab_size": 64}}),
        torch.device("cpu"),
        torch.float32,
    )
    assert batch.groups is not None and batch.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_a_batch_file_has_prompt_groups_only_when_group_size_is_set(tmp_path: Path) -> None:
    path = tmp_path / "batch.safetensors"
    small = ["--set", "source.vocab_size=64", "--set", "source.num_sequences=8"]
    assert invoke("dump", "-o", str(path), *small).exit_code == 0
    read = ["compare", "--losses", "real", "--set", f"source.path={path}", "-f", "json"]
    unset = invoke(*read)
    assert unset.exit_code == 2 and "source.group_size" in unset.output
    stated = invoke(*read, "--set", "source.group_size=4")
    assert stated.exit_code == 0, stated.output
    r = json.loads(stated.stdout)["losses"][0]
    # two groups of four with mixed rewards (seed 0: Â = [0.87, −0.87, −0.87, 0.87] and
    # [−0.5, −0.5, 1.5, −0.5]): both have an O⁺ and an O⁻ member, none is skipped
    assert r["clipping"]["sequence_shares"]["seq_group_skipped"] == 0.0
    # group_size 1 stated: every sequence is a group of one, with one side only: all skipped
    ones = invoke(*read, "--set", "source.group_size=1")
    r1 = json.loads(ones.stdout)["losses"][0]
    assert r1["clipping"]["sequence_shares"]["seq_group_skipped"] == 1.0
    bad = invoke(*read, "--set", "source.group_size=3")
    assert bad.exit_code == 2 and "not a multiple of 3" in bad.output
