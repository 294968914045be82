"""Split invariance: the batch's gradient as a framework computes it under micro-batches × data
parallel × accumulation, against the full-batch gradient of the same loss
(`gradlens.diagnostics.split`; the maths in `gradlens.losses.split`)."""

from __future__ import annotations

from pydantic import Field

from gradlens.results.base import Result


class SplitMicroBatch(Result):
    """One micro-batch of the split and what it does to its tokens' weights."""

    index: int
    rank: int = Field(description="the data-parallel rank it runs on (index mod dp)")
    step: int = Field(description="its accumulation step (index div dp)")
    rows: list[int] = Field(description="[start, stop): the batch rows it holds")
    sequences: int = Field(description="rows with at least one valid token")
    tokens: int = Field(description="valid tokens")
    weight_ratio_min: float | None = Field(description="min over its tokens of w_split / w_full")
    weight_ratio_max: float | None = Field(description="max over its tokens of w_split / w_full")


class SplitSequence(Result):
    """One row of the batch under the split: its micro-batch, its length and its weight factor."""

    row: int
    micro_batch: int = Field(description="the micro-batch that holds it")
    tokens: int = Field(description="its valid tokens (the sequence's length)")
    weight_ratio: float | None = Field(
        description="mean over its tokens of w_split / w_full; null for a row without a token"
    )


class SplitLoss(Result):
    """One loss's lm_head gradient under the split and on the full batch (policy part, the
    c-form: the entropy bonus is left out)."""

    name: str
    grad_norm_full: float | None = Field(description="‖∂L/∂W‖_F of the full batch")
    grad_norm_split: float | None = Field(description="‖∂L/∂W‖_F under the split")
    grad_norm_ratio: float | None = Field(description="grad_norm_split / grad_norm_full")
    grad_rel_diff: float | None = Field(
        description="‖∂L_split/∂W − ∂L_full/∂W‖_F / ‖∂L_full/∂W‖_F: what the check judges"
    )
    passed: bool = Field(description="grad_rel_diff (or, unmeasured, weight_rel_diff) ≤ tolerance")


class SplitReport(Result):
    """``--split micro=…,dp=…,ga=… --convention …``: per-token weights w_t and ‖∂L/∂W‖ under the
    framework's split against the full batch."""

    micro: int = Field(description="sequences per micro-batch")
    dp: int = Field(description="data-parallel ranks (their gradients are averaged)")
    ga: int = Field(description="accumulation steps (their gradients are summed)")
    convention: str = Field(description="the --convention table (verl, trl, openrlhf, ...)")
    framework: str
    versions: str = Field(description="the versions the table holds for")
    setting: str = Field(description="the framework's setting (verl token-mean, TRL bnpo)")
    aggregation: str = Field(description="the gradlens aggregation mode it computes")
    count_empty_sequences: bool = Field(description="S counts every row (B), not only B'")
    scope: str = Field(description="micro: each micro-batch's own normaliser; step: global")
    loss_factor: str = Field(description="the factor on each micro-batch's loss, dp^p·ga^q")
    how: str = Field(description="what the framework's code does, in words")
    source: str = Field(description="where that was read")
    weight_ratio_min: float | None = Field(description="min_t w_split / w_full over valid tokens")
    weight_ratio_max: float | None
    weight_ratio_mean: float | None
    weight_rel_diff: float | None = Field(description="max_t |w_split − w_full| / max_t |w_full|")
    tolerance: float = Field(description="the rounding allowed (tolerance_reason)")
    tolerance_reason: str
    invariant: bool = Field(description="weight_rel_diff ≤ tolerance: the split changes nothing")
    factor: str = Field(description="the split's effect on the weights, in words")
    micro_batches: list[SplitMicroBatch]
    sequences: list[SplitSequence] = Field(
        default_factory=list, description="every row in batch order: what the --plot figure draws"
    )
    losses: list[SplitLoss]
    skipped: list[str] = Field(
        default_factory=list,
        description="losses left out, with the reason (a loss that aggregates itself)",
    )
