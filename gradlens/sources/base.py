"""What every source builder receives besides its own section of the config: plain arguments.

A builder is ``build(section, context) -> Batch``, with ``section`` its own typed config section
(`gradlens.config.SyntheticSource`, ...) and a `SourceContext`; none sees the whole config.
Beside it, each source has a planner ``plan(section, context) -> SourcePlan``: what the batch
will be and what building it costs, from the section alone, so that what cannot be done is
refused before the work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradlens.losses import Aggregation, LossParams
from gradlens.memory import Estimate, Shape


@dataclass(frozen=True)
class SourceContext:
    """The run's settings a source may need.

    Attributes:
        device, dtype: where the batch lives and its operand dtype.
        seed: the run's seed (every random draw of a source comes from it).
        normalization, advantage_eps: how rewards become advantages (`gradlens.advantages`).
        params, aggregation: the run's loss settings (the model source's stale steps minimise a
            loss with them).
        memory_budget_bytes: ``diagnostics.memory_budget_mib`` in bytes: the working memory of a
            source that builds its batch in pieces (the synthetic source above its materialized
            size) and of a pass through a model (`gradlens.sources.microbatch`); None: chosen
            from free memory.
        rank, tensor_parallel: this process's rank in the tensor-parallel group and the group's
            size (1: one process). A source may return only this rank's rows of the lm_head
            (`Batch.weight_rows`); the compare pipeline splits a whole one itself.
    """

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    normalization: str = "group"
    advantage_eps: float = 1e-6
    params: LossParams = field(default_factory=LossParams)
    aggregation: Aggregation = field(default_factory=Aggregation)
    memory_budget_bytes: int | None = None
    rank: int = 0
    tensor_parallel: int = 1


@dataclass(frozen=True)
class SourcePlan:
    """What a source will build, known from its section before it builds anything.

    Attributes:
        memory: the source's own peak memory (`gradlens.memory`), checked before it builds:
            one estimate per place (the host, the run's device).
        shape: the batch's sizes (``tokens`` exact or its upper bound N·T), from which the
            engine's peak is estimated before the source runs; None when only reading the data
            tells (a .jsonl file).
        provides: the optional tensors the batch will carry (``rollout_logp``, ``ref_logp``),
            so that a setting that needs one is refused before any work; None when unknown.
    """

    memory: tuple[Estimate, ...]
    shape: Shape | None
    provides: frozenset[str] | None
