"""The refactored code reproduces the reports recorded before it, field for field.

``tests/golden/*.json`` hold the JSON reports of every shipped config and of the command lines
in ``tests/golden/cases.py``. Each is re-run here and compared: strings, integers and booleans
exactly; floats to a relative 1e-5 (a reordering of float32 operations moves the last digits,
a wrong formula moves far more). Rounding residuals (zero-sum sums, closed form vs autograd
differences), which any reordering changes completely, are compared by their verdicts only:
the ``passed`` flags beside them are compared exactly, and the words of each check's detail
(its numbers are such residuals or fields compared elsewhere). ``environment`` describes the
machine and is skipped. `upgrade` applies the documented schema changes to the old reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from cases import cases  # noqa: E402
from helpers import differences  # noqa: E402
from record import normalise, run_case  # noqa: E402


def upgrade(report: dict[str, Any]) -> dict[str, Any]:
    """A golden report recorded under ``gradlens.compare/1`` in today's schema: the renamed and
    added fields of docs/json-schema.md's changelog, nothing else."""
    report = json.loads(json.dumps(report))
    if "check" in report:  # a sweep summary (gradlens.sweep/1 → /2)
        for loss in report["losses"]:
            loss["per_token_grad_formula"] = loss.pop("coefficient")
        return report
    for loss in report["losses"]:
        loss["per_token_grad_formula"] = loss.pop("coefficient_formula")
    if report["engine"]["reason"].startswith("the whole-model gradients"):
        # a real checkpoint no longer forces the materialized engine (issue: the model source
        # streams); below the threshold it is chosen by size, as for every source
        entries = report["batch"]["num_tokens"] * report["batch"]["vocab_size"]
        report["engine"]["reason"] = f"tokens × vocabulary = {entries} ≤ {1 << 24}"
    report["config"]["diagnostics"].setdefault("stream_above", 1 << 24)
    mismatch = (report.get("model") or {}).get("mismatch")
    if mismatch is not None:
        mismatch["abs_diff_mean"] = mismatch.pop("mean_abs_diff")
        mismatch["abs_diff_max"] = mismatch.pop("max_abs_diff")
        mismatch["rho_mean"] = report["rollout"]["rho_mean"]  # the same statistics now
    return report


@pytest.mark.parametrize(
    "name, argv, setup",
    [
        pytest.param(name, argv, setup, id=name, marks=[pytest.mark.slow] if slow else [])
        for name, argv, slow, setup in cases()
    ],
)
def test_report_reproduces_golden(name: str, argv: list[str], setup, tmp_path: Path) -> None:
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    report = run_case(argv, setup, tmp_path)
    diffs = differences(upgrade(golden), normalise(report, str(tmp_path)))
    assert not diffs, "\n".join(diffs[:40])
