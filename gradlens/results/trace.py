"""The result of ``gradlens trace``: a run's steps, its spikes and what drove each spike.

Schema ``gradlens.trace/1`` (``gradlens trace --format json``); rendered by
`gradlens.report.trace` (table, CSV, JSONL, PNG), computed by `gradlens.trace.run`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradlens.results.base import Result

TRACE_SCHEMA = "gradlens.trace/1"


class TraceColumn(Result):
    key: str = Field(description="the flat metric name (report.metrics(), or grad_norm)")
    label: str = Field(description="the table's and the figure's name for it")
    group: str = Field(description="the figure panel it is drawn in")


class TraceStep(Result):
    step: int
    values: dict[str, float | None] = Field(description="column key → value (None: not known)")
    sources: list[str] = Field(description="where the values came from: metrics, batch file")
    batch_file: str | None = Field(description="the step's batch file, when there is one")
    median: float | None = Field(description="running median of the spike series before it")
    z: float | None = Field(description="robust z-score (x − median)/(1.4826·MAD)")
    spike: bool


class TokenContribution(Result):
    sequence: int
    position: int
    token: int
    text: str | None = Field(description="the token decoded, when a tokenizer is known")
    advantage: float
    ratio: float | None = Field(description="π_θ/π_old at the token")
    coefficient: float = Field(description="c_t = ∂L/∂ℓ_t")
    grad_norm: float = Field(description="‖∂L/∂z_t‖₂ = |c_t|·√(1 − 2π_y + Σπ²)")
    share: float = Field(description="grad_norm / Σ over the batch's tokens")


class SequenceContribution(Result):
    sequence: int
    tokens: int = Field(description="its valid tokens")
    advantage: float = Field(description="its mean advantage over the valid tokens")
    grad_norm_sum: float = Field(description="Σ_t ‖∂L/∂z_t‖ over its tokens")
    share: float = Field(description="grad_norm_sum / Σ over the batch")
    text: str | None = Field(description="the response decoded, when a tokenizer is known")


class SpikeDetail(Result):
    step: int
    series: str = Field(description="the column the spike was found in")
    value: float | None = Field(description="None: not finite (NaN or inf)")
    median: float | None = Field(description="None: no earlier finite value")
    z: float | None = Field(description="None: the value is not finite")
    batch_file: str | None
    loss: str | None = Field(description="the loss whose contributors are listed")
    sequences: list[SequenceContribution] = Field(default_factory=list)
    tokens: list[TokenContribution] = Field(default_factory=list)
    note: str | None = Field(None, description="why contributors are missing, when they are")


class BadFile(Result):
    name: str
    error: str


class TraceReport(Result):
    schema_version: Literal["gradlens.trace/1"] = "gradlens.trace/1"
    target: str = Field(description="the directory or glob traced")
    series: str | None = Field(description="the column spikes are detected in")
    window: int
    threshold: float
    columns: list[TraceColumn]
    steps: list[TraceStep]
    spikes: list[SpikeDetail]
    bad_files: list[BadFile]
