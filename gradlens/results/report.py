"""The compare report: typed results of every diagnostic, and the versioned JSON schema.

Diagnostics return these models; renderers only read them. ``gradlens schema`` prints the JSON
Schema generated from `CompareReport`, so the documented schema and the output cannot drift.
Non-finite numbers (an exploding ``ppo`` gradient) serialise as null and are named in
``findings``; the counts of non-finite entries are always reported.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gradlens.results.attribution import Attribution
from gradlens.results.base import Result
from gradlens.results.mismatch import MismatchReport
from gradlens.results.model import ModelGradients, ModelReport
from gradlens.results.rollout import RolloutStats
from gradlens.results.split import SplitReport
from gradlens.results.support import SupportReport

SCHEMA_VERSION = "gradlens.compare/3"


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
    shares: dict[str, float | None] = Field(
        default_factory=dict,
        description="share of valid tokens in every region the loss and its corrections "
        "reported, by region name (clip_upper, weight_clipped, tis_truncated, ...)",
    )
    sequence_shares: dict[str, float | None] = Field(
        default_factory=dict,
        description="share of sequences in each whole-sequence region (names starting seq_)",
    )


class Agreement(Result):
    """Diagnostic 6: closed form against torch.autograd: max |a − b| / max |b| for c_t (and the
    streamed engines' ∂L/∂z_y), and for ∂L/∂z and ∂L/∂W (its row norms) max |a − b| over the
    size of the terms both sum (`gradlens.diagnostics.agreement`), so that a gradient that
    cancels is not failed for its terms' rounding."""

    coefficient: float | None
    grad_logits: float | None = Field(
        description="∂L/∂z; with the streamed engine its sampled entries ∂L/∂z_y"
    )
    grad_weight: float | None = Field(
        description="∂L/∂W; with the streamed engine its row norms ‖∂L/∂W_v‖"
    )
    tolerance: float
    passed: bool
    ran: bool = Field(True, description="false: no reference was computed (--reference none)")
    weight_judged: bool = Field(
        True,
        description="false: grad_weight is reported but not judged, because the inputs make "
        "∂L/∂W zero or rounding (the `diagnosable` check fails and names why): two correct "
        "computations of a rounding need not agree",
    )
    scope: Literal["full", "sampled"] = Field(
        "full",
        description="full: every token and row; sampled (the streamed engines' default): c_t "
        "of every token, ∂L/∂z_y of sampled_tokens tokens and the norms of sampled_rows rows",
    )
    sampled_tokens: int | None = Field(None, description="scope sampled: tokens checked")
    sampled_rows: int | None = Field(None, description="scope sampled: lm_head rows checked")


class Signal(Result):
    """Whether the batch gives this loss a gradient to diagnose: c_t = 0 at every token in the
    loss makes ∂L/∂z and ∂L/∂W identically zero (the entropy bonus's part aside), and every
    other check of the loss holds vacuously."""

    zero: bool = Field(
        description="c_t = 0 at every token in the loss and no entropy bonus (or no token), "
        "or ∂L/∂W exactly zero because of the inputs (every hidden state in the loss zero, "
        "π_θ(y) = 1 at every token)"
    )
    cause: str | None = Field(description="why, in words; null when the gradient is not zero")
    from_inputs: bool = Field(
        description="the cause lies in the batch (no token in the loss, every advantage zero "
        "under a loss that scales with A, every token masked by loss.corrections, an lm_head "
        "gradient the hidden states or a one-hot π make exactly zero; with zero false, a "
        "gradient that is only rounding because π_θ(y) rounds to 1 at every token): the batch "
        "cannot support a diagnosis of this loss and the `diagnosable` check fails. false for "
        "a gradient the loss's own rules switched off (a clip on every token): that is what "
        "the diagnosis found"
    )


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
    per_token_grad_formula: str = Field(
        description="g_t = ∂(per-token loss)/∂ℓ_t, before the aggregation weight a_t"
    )
    loss: float | None = Field(description="aggregated loss value L")
    coefficient_abs_mean: float | None = Field(description="mean_t |c_t| over valid tokens")
    coefficient_abs_max: float | None
    non_finite: int = Field(description="non-finite entries in ∂L/∂z and ∂L/∂W")
    signal: Signal = Field(description="whether the gradient is identically zero, and why")
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
    model_grads: ModelGradients | None = Field(
        None,
        description="a real checkpoint (the model source, or a batch file with "
        "source.model_path): whole-model gradient norms of this loss",
    )
    metrics: dict[str, float | None] = Field(
        default_factory=dict,
        description="further numbers of this loss: per-token metrics aggregated with the run's "
        "weights (kl: grpo's KL estimate before β; sapo_gate: SAPO's mean gate) and "
        "reported:<name>, the metrics a verl-shaped function returned itself",
    )
    attribution: Attribution | None = Field(
        None,
        description="which sequences, tokens, loss terms and token groups carry the lm_head "
        "update, and the entropy change of one step (diagnostics.attribution; null when off, "
        "or when ‖∂L/∂W‖ is zero or not finite)",
    )


class Check(Result):
    """One pass/fail invariant; ``--check`` exits non-zero when any fails."""

    name: str
    loss: str | None
    passed: bool
    detail: str


class ParityPosition(Result):
    """One token where the two losses' coefficients differ."""

    sequence: int
    position: int
    token: int
    coefficient_a: float | None = Field(description="c_t of loss A")
    coefficient_b: float | None = Field(description="c_t of loss B")
    abs_diff: float | None = Field(description="|c_t(A) − c_t(B)|")


class ParitySide(Result):
    """One of the two losses, as parity sees it."""

    name: str
    loss: float | None = Field(description="the loss value L")
    grad_norm: float | None = Field(description="‖∂L/∂W‖_F")
    clipping: Clipping
    metrics: dict[str, float | None] = Field(default_factory=dict)


class ParityReport(Result):
    """``--parity A,B``: where two implementations of a loss differ on the same batch, and why
    (``findings``)."""

    a: ParitySide
    b: ParitySide
    coefficient_max_abs_diff: float | None = Field(description="max_t |c_t(A) − c_t(B)|")
    coefficient_rel: float | None = Field(
        description="max_t |Δc_t| / max_t max(|c_t(A)|, |c_t(B)|): what the tolerance judges"
    )
    differing_tokens: int = Field(description="valid tokens with |Δc_t| above the tolerance")
    top: list[ParityPosition] = Field(description="the largest |Δc_t|, largest first")
    grad_norm_ratio: float | None = Field(description="‖∂L_B/∂W‖ / ‖∂L_A/∂W‖")
    loss_diff: float | None = Field(description="L_B − L_A")
    grad_logits_rel: float | None = Field(
        description="max |∂L_A/∂z − ∂L_B/∂z| / max |∂L_A/∂z|, over tokens and vocabulary"
    )
    row_max_rel: float | None = Field(
        description="max_v ‖∂L_A/∂W_v − ∂L_B/∂W_v‖ / max_v ‖∂L_A/∂W_v‖ (lm_head rows)"
    )
    tolerance: float
    passed: bool
    findings: list[str]


class MetricName(Result):
    """One quantity of the report and what the RL frameworks call it (losses.md §11.2)."""

    key: str = Field(description="where gradlens reports it (a JSON path; [] = each loss)")
    quantity: str
    verl: str | None
    trl: str | None
    openrlhf: str | None
    slime: str | None
    note: str | None = Field(None, description="where the frameworks disagree or differ")


class EngineInfo(Result):
    """Which path computed the lm_head diagnostics, and how the streamed one cut the work."""

    path: Literal["materialized", "streamed", "fused"]
    reason: str
    vocab_chunk: int | None = None
    resident_chunks: int | None = Field(None, description="chunks whose logits stayed in memory")
    budget_bytes: int | None = None
    gemm_equivalents: float | None = Field(
        None,
        description="GEMMs run, in units of one logits GEMM 2·M·H·V (floor: 1 + k); under "
        "tensor parallelism the total over all ranks",
    )
    tensor_parallel: int = Field(
        1, description="ranks the lm_head's vocabulary rows were split over (1: one process)"
    )
    vocab_rows: list[int] | None = Field(
        None, description="tensor_parallel > 1: the vocabulary rows of each rank, in rank order"
    )


class CompareReport(Result):
    schema_version: Literal["gradlens.compare/3"] = "gradlens.compare/3"
    environment: Environment
    config: dict[str, Any] = Field(description="the resolved configuration")
    batch: BatchSummary
    ratio: RatioStats
    losses: list[LossReport]
    checks: list[Check]
    passed: bool = Field(description="every check passed")
    model: ModelReport | None = Field(
        None,
        description="a real checkpoint: the model source (every section) or a batch file "
        "with source.model_path (no rollout, mismatch or staleness)",
    )
    rollout: RolloutStats | None = Field(
        None, description="training–inference gap, when the batch has rollout log-probs"
    )
    mismatch: MismatchReport | None = Field(
        None,
        description="the training–inference gap localised, when the batch has rollout "
        "log-probs: the frameworks' statistics, by π_old and position, the worst tokens",
    )
    support: SupportReport | None = Field(
        None,
        description="the rollout's top-p/top-k kept sets K_t, when the batch records them: the "
        "kept mass and what replaying it (loss.sampling_support) changes",
    )
    parity: list[ParityReport] = Field(
        default_factory=list, description="--parity A,B (once per pair): each pair compared"
    )
    split: SplitReport | None = Field(
        None,
        description="--split: the gradient as a framework computes it under micro-batches × "
        "data parallel × accumulation, against the full batch",
    )
    engine: EngineInfo | None = Field(None, description="how the lm_head gradients were computed")
    metric_names: list[MetricName] = Field(
        default_factory=list, description="the framework names of the report's quantities"
    )

    def metrics(self, prefix: str = "gradlens") -> dict[str, float]:
        """The report's numbers as one flat mapping, for a training log (TensorBoard, W&B).

        Keys: ``{prefix}/{section}/{field}`` for the shared sections (``batch``, ``ratio``,
        ``rollout``, ``mismatch``'s statistics), ``{prefix}/{loss}/{field}`` per loss (nested
        fields joined by ``/``, e.g.
        ``gradlens/ppo_clip/clipping/region``; ``lm_head_norm`` = ``rows/total_norm``), and the
        same numbers again under the frameworks' names where the crosswalk (``metric_names``)
        has one: ``{prefix}/{loss}/verl/actor/pg_clipfrac``, ``{prefix}/trl/...``. Missing and
        non-finite values are left out (``non_finite`` counts say so).
        """
        out: dict[str, float] = {}

        def put(key: str, value: Any) -> None:
            if isinstance(value, bool) or value is None:
                return
            if isinstance(value, int | float):
                out[key] = float(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    put(f"{key}/{k}", v)

        for section in ("batch", "ratio", "rollout", "mismatch", "support"):
            part = getattr(self, section)
            if part is not None:
                put(f"{prefix}/{section}", part.model_dump())
        for loss in self.losses:
            fields = loss.model_dump(exclude={"tokens", "findings", "rows", "attribution"})
            if loss.attribution is not None:  # its numbers, not its lists
                fields["attribution"] = loss.attribution.model_dump(
                    include={"grad_norm_sq", "share_sum", "sequences_to_half", "groups", "entropy"}
                )
            fields["rows"] = loss.rows.model_dump(exclude={"top_rows"})
            if loss.model_grads is not None:
                fields["model_grads"] = {"total_norm": loss.model_grads.total_norm}
            put(f"{prefix}/{loss.name}", fields)
            put(f"{prefix}/{loss.name}/lm_head_norm", loss.rows.total_norm)
        for row in self.metric_names:
            for framework in ("verl", "trl", "openrlhf", "slime"):
                name = getattr(row, framework)
                if name is None:
                    continue
                if row.key.startswith("losses[]."):
                    path = "/" + row.key.removeprefix("losses[].").replace(".", "/")
                    for loss in self.losses:
                        value = out.get(f"{prefix}/{loss.name}{path}")
                        if value is not None:
                            out[f"{prefix}/{loss.name}/{framework}/{name}"] = value
                else:
                    value = out.get(f"{prefix}/{row.key.replace('.', '/')}")
                    if value is not None:
                        out[f"{prefix}/{framework}/{name}"] = value
        return out


class ParityMatrixEntry(Result):
    """One setting of ``--parity-matrix``: its values and every pair's parity under them."""

    settings: dict[str, Any] = Field(description="the dotted keys set for this run, and values")
    parity: list[ParityReport]
    passed: bool = Field(description="every check of this run passed (parity included)")


class ParityMatrixReport(Result):
    """``gradlens compare --parity A,B --parity-matrix KEY=[v1, v2]``: the pairs under every
    combination of the settings, in one process (each framework imported once)."""

    schema_version: Literal["gradlens.parity-matrix/1"] = "gradlens.parity-matrix/1"
    environment: Environment
    config: dict[str, Any] = Field(description="the configuration before the matrix's settings")
    entries: list[ParityMatrixEntry]
    passed: bool = Field(description="every run passed")
