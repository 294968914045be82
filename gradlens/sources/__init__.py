"""Where batches come from: a registry keyed by ``source.kind``.

Each builder receives its own section of the config and a `SourceContext` of plain settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradlens.containers import Batch
from gradlens.memory import check_fits
from gradlens.sources.base import SourceContext, SourcePlan
from gradlens.sources.batch import build_batch_file, plan_batch_file
from gradlens.sources.literal import build_literal, plan_literal
from gradlens.sources.model import build_model_batch, plan_model
from gradlens.sources.synthetic import build_synthetic, plan_synthetic
from gradlens.validation import check_batch


@dataclass(frozen=True)
class SourceKind:
    """One source: its builder and its planner (`SourcePlan`)."""

    build: Callable[[Any, SourceContext], Batch]
    plan: Callable[[Any, SourceContext], SourcePlan]


SOURCES: dict[str, SourceKind] = {
    "synthetic": SourceKind(build_synthetic, plan_synthetic),
    "literal": SourceKind(build_literal, plan_literal),
    "batch": SourceKind(build_batch_file, plan_batch_file),
    "model": SourceKind(build_model_batch, plan_model),
}


def plan_source(section: Any, ctx: SourceContext) -> SourcePlan:
    """What the source section ``section`` will build and what building it costs."""
    return SOURCES[section.kind].plan(section, ctx)


def build_source(section: Any, ctx: SourceContext) -> Batch:
    """The batch described by the source section ``section`` (any of the config's kinds).

    Its peak memory is checked first (`gradlens.memory`: a batch that cannot fit is refused
    before anything is allocated), and the batch it builds by the one rule of
    `gradlens.validation` for every source.
    """
    for estimate in plan_source(section, ctx).memory:
        check_fits(estimate, ctx.device)
    batch = SOURCES[section.kind].build(section, ctx)
    check_batch(batch)
    return batch


__all__ = ["SOURCES", "SourceContext", "SourcePlan", "build_source", "plan_source"]
