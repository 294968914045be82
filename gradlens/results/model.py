"""Report models of a real checkpoint: the model, the rollout, drift, whole-model gradients.

They hang off the main report as optional fields (`CompareReport.model`,
`LossReport.model_grads`), which are null for the synthetic and literal sources and for a batch
file without a checkpoint. The model source fills every section; a batch file whose hidden
states a checkpoint recomputes (``source.model_path``) has the checkpoint and the whole-model
gradients, and null rollout, mismatch and staleness (`ModelReport.source` says which).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradlens.results.base import Result
from gradlens.results.rollout import RolloutStats

# A measured norm within this factor of the seed post's prediction counts as agreement. The
# post's estimate drops every factor of order one (the hidden-state norms, the mass on the
# other rows, cancellation between tokens) and claims only a rough match with its runs, so a
# factor of 2 either way is a lenient reading; outside it the estimate would misjudge the
# grad-norm by more than the spread of common clipping thresholds (0.5 to 1.0).
PREDICTION_FACTOR = 2.0


class ModelInfo(Result):
    """The checkpoint that was loaded."""

    path: str = Field(description="the checkpoint directory ('built-in' for the shipped model)")
    builtin: bool
    architecture: str
    parameters: int
    layers: int | None
    hidden_size: int
    vocab_size: int = Field(description="rows of the lm_head")
    tokenizer_size: int
    context: int | None = Field(description="max_position_embeddings")
    tied_embeddings: bool = Field(description="lm_head and input embedding share one tensor")
    lm_head_bias: bool
    train_dtype: str
    rollout_dtype: str | None = Field(
        description="precision of the rollout pass (model source); null for a batch file"
    )


class RolloutSample(Result):
    sequence: int
    prompt: str
    completion: str
    tokens: int = Field(description="completion tokens in the loss (the EOS token included)")
    reward: float


class RolloutSummary(Result):
    """What was sampled, and which log-probs are π_old and μ."""

    prompts: int
    group_size: int
    sequences: int
    completion_tokens: int
    mean_completion_length: float
    stopped_at_eos: int = Field(description="sequences that ended with the EOS token")
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int = Field(0, description="top-k of the sampler; 0: off")
    reward: str
    chat_template: bool = Field(
        False, description="the prompts were user messages in the tokenizer's chat template"
    )
    mean_reward: float
    reward_std: float
    logp_definition: str
    samples: list[RolloutSample]


class Mismatch(RolloutStats):
    """Training–inference mismatch: μ (rollout pass) against π_old (training pass), same θ.

    The statistics of ρ = π_old(y)/μ(y) over the completion tokens (`RolloutStats`, as verl's
    ``rollout_corr/*`` and slime log them), with the precisions of the two passes.
    """

    rollout_dtype: str
    train_dtype: str


class ModelPass(Result):
    """How one pass through the whole model ran: its memory plan (gradlens.sources.microbatch)."""

    name: str = Field(description="'stale steps' or 'whole-model gradients'")
    micro_batches: int = Field(description="groups of sequences that went through together")
    forwards: int = Field(description="forward passes with autograd, over all micro-batches")
    backwards: int = Field(description="backward passes, over all micro-batches")
    checkpointed: bool = Field(description="transformer blocks recomputed in the backward")
    recompute_dtype: str | None = Field(
        None,
        description="the dtype the blocks were recomputed in under autocast for the backward "
        "(source.stale.grad_dtype); null: the model's own",
    )
    budget_bytes: int = Field(description="the memory budget of one micro-batch")
    bytes_per_sequence: int = Field(
        description="what one sequence's forward keeps for the backward (measured)"
    )
    over_budget: bool = Field(description="a single sequence exceeds the budget")
    positions: int = Field(
        description="positions one forward of the whole batch computes: the padded grid's "
        "N·L, fewer with the completions of a prompt packed after one copy of it"
    )
    padded_positions: int = Field(description="N·L, the padded grid's positions")
    shared_prefix: bool = Field(
        description="completions packed after one copy of their prompt (source.shared_prefix)"
    )
    replayed_forward: bool = Field(
        False,
        description="the blocks' forward was the stale steps' last one, at the same parameters "
        "over the same sequences, recorded and replayed (no forward of the blocks of its own)",
    )


class StaleStep(Result):
    """The ratio r = π_θk/π_old after k optimizer steps on the rollout batch."""

    step: int
    lr: float | None = Field(
        None, description="learning rate of the step θ_(k−1) → θ_k (null at k = 0)"
    )
    probes: int = Field(
        0, description="times that step was redone with another learning rate (target_kl)"
    )
    subset_probes: int = Field(
        0,
        description="of the probes, those measured on a quarter of each prompt group's "
        "completions (every prompt represented) by a forward without autograd: the first "
        "step's search starts there",
    )
    loss: float | None = Field(description="the stale loss at θ_k (null after the last step)")
    ratio_mean: float | None
    ratio_min: float | None
    ratio_p05: float | None
    ratio_p50: float | None
    ratio_p95: float | None
    ratio_max: float | None
    kl_k3: float | None = Field(description="mean(r − 1 − log r)")
    clip_upper: float = Field(description="share of tokens with A>0 ∧ r>1+eps_high")
    clip_lower: float = Field(description="share of tokens with A<0 ∧ r<1−eps_low")
    clip_region: float = Field(description="upper + lower (verl actor/pg_clipfrac)")


class Staleness(Result):
    steps: int
    optimizer: str
    lr: float = Field(description="the configured learning rate (with target_kl: the first guess)")
    target_kl: float | None = Field(
        None, description="the KL k3 of π_θN against π_old the steps aimed at; null: lr fixed"
    )
    loss: str
    trajectory: list[StaleStep]
    model_pass: ModelPass | None = Field(None, description="how the steps ran through the model")


class GradGroup(Result):
    name: str
    parameters: int
    norm: float | None


class GradNormPrediction(Result):
    """The seed post's grad-norm estimate against the measured whole-model norm."""

    formula: str
    inputs: str = Field(description="the measured quantities the estimate is made from")
    predicted: float | None
    measured: float | None = Field(description="total gradient norm of the whole model")
    ratio: float | None = Field(description="measured / predicted")
    per_token: float | None = Field(
        description="mean_t |g_t|·(1 − π_θ(y_t)): the per-token sampled-logit gradient the "
        "estimate starts from, before aggregation"
    )
    threshold: float = Field(description="agreement when 1/threshold ≤ ratio ≤ threshold")
    agrees: bool


class ModelGradients(Result):
    """One loss through the whole model: per-tensor-group gradient norms on the same batch."""

    total_norm: float | None = Field(description="‖∇L‖ over every parameter (trainer grad_norm)")
    groups: list[GradGroup]
    lm_head_logit_path: float | None = Field(
        description="‖∂L/∂W‖ of the lm_head through the logits only"
    )
    tied: bool
    tied_grad_norm: float | None = Field(
        description="tied models: ‖.grad‖ of the shared embedding/lm_head tensor (both paths)"
    )
    prediction: GradNormPrediction | None


class SftOverRl(Result):
    """The post's claim that SFT's grad-norm is about an order of magnitude above RL's."""

    sft: str
    rl: str
    predicted: float | None
    measured: float | None


class ModelReport(Result):
    """The checkpoint the losses ran through, and the sections its source produces."""

    source: Literal["model", "batch"] = Field(
        "model",
        description="where the batch came from. model: sampled from the checkpoint (source.kind "
        "model), every section present. batch: read from a batch file (source.path) whose hidden "
        "states the checkpoint recomputed (source.model_path); rollout, mismatch and staleness "
        "are null",
    )
    batch_file: str | None = Field(None, description="source batch: the batch file read")
    model: ModelInfo
    rollout: RolloutSummary | None = Field(None, description="model source only")
    mismatch: Mismatch | None = Field(None, description="model source only")
    staleness: Staleness | None = Field(None, description="model source only")
    sft_over_rl: list[SftOverRl]
    gradient_pass: ModelPass | None = Field(
        None, description="how the whole-model gradients ran through the model"
    )
    notes: list[str] = Field(
        default_factory=list,
        description="what stands out about the checkpoint and its batch, in words",
    )
