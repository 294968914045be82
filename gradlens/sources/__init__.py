"""Where batches come from: a registry keyed by ``source.kind``.

Each builder receives its own section of the config and a `SourceContext` of plain settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradlens.containers import Batch
from gradlens.sources.base import SourceContext
from gradlens.sources.batch import build_batch_file
from gradlens.sources.literal import build_literal
from gradlens.sources.model import build_model_batch
from gradlens.sources.synthetic import build_synthetic

SourceBuilder = Callable[[Any, SourceContext], Batch]

SOURCES: dict[str, SourceBuilder] = {
    "synthetic": build_synthetic,
    "literal": build_literal,
    "batch": build_batch_file,
    "model": build_model_batch,
}


def build_source(section: Any, ctx: SourceContext) -> Batch:
    """The batch described by the source section ``section`` (any of the config's kinds)."""
    return SOURCES[section.kind](section, ctx)


__all__ = ["SOURCES", "SourceContext", "build_source"]
