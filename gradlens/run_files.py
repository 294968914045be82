"""The files a hooked training run writes into its gradlens directory, and how they are named.

    metrics.jsonl            one JSON object per optimizer step: ``step``, ``grad_norm``,
                             ``running_median`` (of the earlier steps' grad_norm), ``spike``,
                             ``batch_file`` (the file's name when the step was dumped, else
                             null) and, on the steps gradlens diagnosed, every number of
                             ``report.metrics()`` under its flat name
    step_000120.safetensors  the batch of a spike step, in the batch-file format
                             (gradlens.batchfile): responses, response_mask, old_log_probs,
                             advantages, ref_log_prob / rollout_log_probs when the run has
                             them, hidden_states (already divided by the sampling temperature),
                             lm_head_weight, and prompts + attention_mask (verl's layout)
    step_000120.json         its sidecar: ``step``, ``grad_norm``, ``running_median``,
                             ``spike_factor``, ``model_path`` (the checkpoint the run started
                             from), ``checkpoint`` (the newest checkpoint saved before the
                             step, or null), ``framework``, and ``losses`` / ``loss`` /
                             ``dtype``: the settings the step was diagnosed with

`gradlens trace` reads a directory of these (or any batch files: a file without a sidecar is
diagnosed with the default losses and ordered by the number in its name).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
STEP_STEM = "step_{step:06d}"
SIDECAR_SUFFIX = ".json"


def step_stem(step: int) -> str:
    return STEP_STEM.format(step=step)


def sidecar_path(batch_file: Path) -> Path:
    """``step_000120.safetensors`` → ``step_000120.json``."""
    return batch_file.with_suffix(SIDECAR_SUFFIX)


def finite_or_none(value: Any) -> float | None:
    """A JSON-safe number: NaN and ±inf become null (JSON has no such numbers)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(row), sort_keys=False) + "\n")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(data), indent=2) + "\n", encoding="utf-8")
