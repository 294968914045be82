"""Where batches come from: a registry keyed by ``source.kind``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradlens.containers import Batch
from gradlens.sources.batchfile import build_batchfile
from gradlens.sources.literal import build_literal
from gradlens.sources.model import build_model_batch
from gradlens.sources.synthetic import build_synthetic

# Every builder takes (source section, the whole config, device, dtype) and returns a Batch.
SourceBuilder = Callable[[Any, Any, torch.device, torch.dtype], Batch]

SOURCES: dict[str, SourceBuilder] = {
    "synthetic": build_synthetic,
    "literal": build_literal,
    "batch": build_batchfile,
    "model": build_model_batch,
}


def build_batch(config: Any, device: torch.device, dtype: torch.dtype) -> Batch:
    """The batch described by ``config.source``."""
    return SOURCES[config.source.kind](config.source, config, device, dtype)
