"""What the two engines of ``compare`` take and give, so that the pipeline treats them alike.

`EngineOptions` are the diagnostics settings as plain values; an engine returns an `EngineRun`:
one `LossRecord` per loss, the per-token summary (`TokenSummary`), how it ran (`EngineInfo`) and,
with ``--parity``, the inputs of each pair's parity report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradlens.compare.parity import ParityInputs
from gradlens.compare.records import LossRecord, TokenSummary
from gradlens.results import EngineInfo


@dataclass(frozen=True)
class EngineOptions:
    """The diagnostics settings an engine reads.

    Attributes:
        top_k: rows listed in the top-rows table.
        token_details: per-token gradients in the report (materialized engine only).
        reference: the check against torch.autograd, decided once by `gradlens.compare.run`:
            full (every token and row), sampled (`gradlens.compare.sampled_check`; the
            materialized engine checks in full), none.
        memory_budget_bytes: the streamed engine's working memory; None: its automatic budget.
        vocab_chunk: the streamed engine's rows per chunk; None: from the budget.
        attribution: the attribution sums of every reported loss (decided once, by
            `gradlens.compare.run`).
    """

    top_k: int = 10
    token_details: bool = False
    reference: str = "full"
    memory_budget_bytes: int | None = None
    vocab_chunk: int | None = None
    attribution: bool = False


@dataclass(frozen=True)
class EngineRun:
    records: list[LossRecord]
    tokens: TokenSummary
    info: EngineInfo
    parity: list[ParityInputs] = field(default_factory=list)  # one per pair, in order
