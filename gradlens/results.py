"""The report: typed results of every diagnostic, and the versioned JSON schema they define.

Diagnostics return these models; renderers only read them. ``gradlens schema`` prints the JSON
Schema generated from `CompareReport`, so the documented schema and the output cannot drift.
Non-finite numbers (an exploding ``ppo`` gradient) serialise as null and are named in
``findings``; the counts of non-finite entries are always reported.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "gradlens.compare/1"


class Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Environment(Result):
    gradlens: str
    python: str
    torch: str
    platform: str
    device: str = Field(description="the torch device the run used")
    dtype: str = Field(description="operand dtype of hidden states and lm_head")
    softmax_dtype: str
    seed: int


class BatchSummary(Result):
    source: str
    num_sequences: int
    num_tokens: int = Field(description="valid (unmasked) tokens M")
    vocab_size: int
    hidden_size: int
    advantages: str = Field(description="how the advantages were obtained")
    mean_entropy: float | None = Field(description="mean H(π_θ) over valid tokens, nats")
    mean_sampled_prob: float | None = Field(description="mean π_θ(y_t)")
    mean_abs_advantage: float | None
    logp_max: float | None = Field(description="max ℓ_old over valid tokens; must be ≤ 0")


class RatioStats(Result):
    """r = π_θ(y)/π_old(y) over valid tokens (shared by every loss)."""

    count: int
    non_finite: int
    mean: float | None
    min: float | None
    p01: float | None
    p05: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    kl_k1: float | None = Field(description="mean(ℓ_old − ℓ) = verl actor/ppo_kl")
    kl_k3: float | None = Field(description="mean((r − 1) − log r), k3 estimate of KL(old‖new)")


class SampledRow(Result):
    """Diagnostic 1: the sampled token's logit gradient against the other tokens'."""

    post_formula: str = Field(description="the seed post's closed form of |∂L/∂z_y|, times a_t")
    sampled_abs_mean: float | None = Field(description="mean_t |∂L/∂z_{t,y}|")
    sampled_abs_max: float | None
    other_mass_mean: float | None = Field(description="mean_t Σ_{j≠y} |∂L/∂z_{t,j}|")
    other_abs_max: float | None = Field(description="max_{t, j≠y} |∂L/∂z_{t,j}|")
    post_max_rel_err: float | None = Field(
        description="max_t ||∂L/∂z_y| − a_t·|g_t|·(1 − π_y)| / max_t |∂L/∂z_y|"
    )


class RowGroup(Result):
    count: int
    sq_share: float | None = Field(description="share of ‖∂L/∂W‖²_F carried by these rows")
    max: float | None
    median: float | None


class TopRow(Result):
    token: int
    norm: float | None
    sampled: bool = Field(description="token was sampled somewhere in the batch")


class RowNorms(Result):
    """Diagnostic 2: per-row norms ‖∂L/∂W_v‖ of the lm_head gradient."""

    total_norm: float | None = Field(description="‖∂L/∂W‖_F")
    sampled_rows: RowGroup
    other_rows: RowGroup
    top_rows: list[TopRow]


class ZeroSum(Result):
    """Diagnostic 3: Σ_v ∂L/∂z_v = 0 per token and Σ_v ∂L/∂W_v = 0."""

    logits_max_abs: float | None = Field(description="max_t |Σ_v ∂L/∂z_{t,v}|")
    logits_max_rel: float | None = Field(description="max_t |Σ_v ∂L/∂z_{t,v}| / s_t")
    logits_tolerance: float
    weight_rel: float | None = Field(description="‖Σ_v ∂L/∂W_v‖ / ‖∂L/∂W‖_F")
    weight_tolerance: float
    passed: bool


class Clipping(Result):
    """Diagnostic 5: shares of valid tokens (or sequences) each rule switched off.

    null: the rule does not exist for this loss or is not enabled.
    """

    upper: float | None = Field(description="A>0 ∧ r>1+eps_high; TRL clip_ratio/high_mean")
    lower: float | None = Field(description="A<0 ∧ r<1−eps_low; TRL clip_ratio/low_mean")
    region: float | None = Field(
        description="upper + lower; verl actor/pg_clipfrac, TRL clip_ratio/region_mean, "
        "OpenRLHF ppo_clip_ratio, slime pg_clipfrac"
    )
    dual: float | None = Field(description="A<0 ∧ r>c; verl actor/pg_clipfrac_lower")
    seq_masked_sequences: float | None = Field(description="share of sequences OPSM removed")
    seq_masked_tokens: float | None = Field(description="share of valid tokens in them")
    zero_grad: float = Field(description="share of valid tokens with c_t = 0, for any reason")


class Agreement(Result):
    """Diagnostic 6: closed form against torch.autograd, max |a − b| / max |b| per tensor."""

    coefficient: float | None
    grad_logits: float | None
    grad_weight: float | None
    tolerance: float
    passed: bool


class TokenDetail(Result):
    """One valid token in full (literal configs and other small batches)."""

    sequence: int
    position: int
    token: int
    prob: float | None = Field(description="π_θ(y)")
    old_prob: float | None = Field(description="π_old(y)")
    ratio: float | None
    advantage: float
    weight: float = Field(description="aggregation weight a_t")
    coefficient: float | None = Field(description="c_t = a_t·g_t")
    grad_sampled: float | None = Field(description="∂L/∂z_y")
    grad_logits: list[float | None] = Field(description="∂L/∂z_t over the vocabulary")


class LossReport(Result):
    name: str
    formula: str
    coefficient_formula: str
    loss: float | None = Field(description="aggregated loss value L")
    coefficient_abs_mean: float | None = Field(description="mean_t |c_t| over valid tokens")
    coefficient_abs_max: float | None
    non_finite: int = Field(description="non-finite entries in ∂L/∂z and ∂L/∂W")
    reference_non_finite: int = Field(
        0, description="non-finite entries in the autograd reference's ∂L/∂z and ∂L/∂W"
    )
    sampled_row: SampledRow
    rows: RowNorms
    zero_sum: ZeroSum
    clipping: Clipping
    agreement: Agreement
    findings: list[str]
    tokens: list[TokenDetail] | None = None


class Check(Result):
    """One pass/fail invariant; ``--check`` exits non-zero when any fails."""

    name: str
    loss: str | None
    passed: bool
    detail: str


class CompareReport(Result):
    schema_version: Literal["gradlens.compare/1"] = "gradlens.compare/1"
    environment: Environment
    config: dict[str, Any] = Field(description="the resolved configuration")
    batch: BatchSummary
    ratio: RatioStats
    losses: list[LossReport]
    checks: list[Check]
    passed: bool = Field(description="every check passed")
