"""Typed containers passed between the stages: source → losses → gradients → diagnostics.

Shapes: N sequences padded to length T, vocabulary V, hidden size H, and M = the number of
valid (unmasked) tokens. Tensors on the [N, T] grid hold anything at masked positions; every
consumer reads them through ``mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.results.model import ModelPass


@dataclass(frozen=True)
class Sequences:
    """Prompt + completion token ids of N sequences, on one [N, L] grid.

    Prompts are left-padded, completions right-padded; position t of the [N, T = L − 1] loss
    grid predicts token t + 1 from the final hidden state at t.
    """

    input_ids: Tensor  # [N, L]
    attention_mask: Tensor  # [N, L] 1 at real tokens
    position_ids: Tensor  # [N, L]
    loss_mask: Tensor  # [N, L − 1] bool: completion tokens that enter the loss
    # forwards pack the completions of one prompt after one copy of it
    # (gradlens.sources.shared_prefix); set only after the model passed the check there
    share_prefix: bool = False

    @property
    def tokens(self) -> Tensor:
        return self.input_ids[:, 1:]  # [N, T]

    def select(self, rows: list[int]) -> Sequences:
        """The sequences ``rows``, on the same [n, L] grid width."""
        index = torch.tensor(rows, device=self.input_ids.device)
        return Sequences(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.loss_mask[index],
            self.share_prefix,
        )


@dataclass
class LoadedModel:
    """A causal-LM checkpoint ready for rollouts and training passes."""

    model: Any  # a transformers PreTrainedModel in the training dtype, eval mode, on the device
    tokenizer: Any  # its transformers tokenizer
    path: Path
    builtin: bool
    context: int | None  # max_position_embeddings (n_positions for GPT-2), None if unbounded

    @property
    def head(self) -> Any:
        """The lm_head module (its ``weight`` [V, H], and ``bias`` [V] if it has one)."""
        return self.model.get_output_embeddings()

    @property
    def tied(self) -> bool:
        return bool(self.head.weight is self.model.get_input_embeddings().weight)

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    @property
    def bias(self) -> bool:
        """The lm_head has a bias (folded into W as a last column)."""
        return getattr(self.head, "bias", None) is not None


@dataclass(frozen=True)
class RolloutRecord:
    """What the model source sampled, as plain data (the report is built from it).

    ``prompts[i]`` is sequence i's prompt (``group_size`` consecutive sequences share one);
    ``prompt_count`` distinct prompts.
    """

    prompts: list[str]
    prompt_count: int
    group_size: int
    completions: list[str]
    rewards: list[float]
    stopped: int  # sequences that ended with the EOS token
    max_new_tokens: int
    temperature: float
    top_p: float
    reward: str  # the reward function's name
    rollout_dtype: str
    top_k: int = 0  # 0: no top-k
    chat_template: bool = False  # the prompts were rendered in the tokenizer's chat template


@dataclass(frozen=True)
class StalePoint:
    """π_θk after k optimizer steps on the rollout batch: its [N, T] log-probs and stale loss."""

    step: int
    loss: float | None  # the stale loss at θ_k (None after the last step)
    logp: Tensor  # [N, T] log π_θk(y_t)
    lr: float | None = None  # the learning rate of the step θ_{k−1} → θ_k (None at k = 0)
    probes: int = 0  # times that step was redone with another learning rate (target_kl)
    subset_probes: int = 0  # of those, measured on a subset of the sequences without autograd


@dataclass(frozen=True)
class StalenessRecord:
    """The optimizer steps between rollout and diagnosis, as plain data."""

    steps: int
    optimizer: str
    lr: float  # the configured (with target_kl: the first step's starting) learning rate
    loss: str
    trajectory: list[StalePoint]
    target_kl: float | None = None
    model_pass: ModelPass | None = None  # how the steps went through the model


@dataclass
class BlockTape:
    """A forward's record of a causal LM's transformer blocks (gradlens.sources.blockwise).

    Attributes:
        blocks: the transformer blocks B_1 … B_n, in order.
        inputs: each block's (args, kwargs), its hidden-state input detached.
        outputs: each block's output as it returned it (the last block's with ``exit``).
        entry: x_0 as the first block received it, with its graph to the embedding.
        exit: x̂_n, the last block's output as a leaf (requiring grad when autograd was on).
        parameters: (storage address, version) of every parameter at the recording: a
            replay checks that none has been written since.
    """

    blocks: list[nn.Module]
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    entry: Tensor | None = None
    exit: Tensor | None = None
    parameters: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ModelContext:
    """The checkpoint a batch came from: what the whole-model gradients and the report need.

    The final hidden states of ``sequences`` ([N, L − 1] columns) from column ``offset`` on are
    the batch's [N, T] grid: ``offset`` 0 for the model source, whose grid is the whole
    sequence; P − 1 for a batch file with P prompt columns, whose grid is the response.
    """

    loaded: LoadedModel  # the model at θ (after any stale steps)
    sequences: Sequences
    temperature: float
    train_dtype: str
    offset: int = 0
    keys: str = "source.kind: model"  # the settings that asked for it, named by errors
    whole_model: bool = True  # run every loss through the whole model
    rollout: RolloutRecord | None = None  # model source only
    staleness: StalenessRecord | None = None  # model source only
    batch_file: str | None = None  # a batch file whose hidden states the checkpoint recomputed
    notes: list[str] = field(default_factory=list)  # what the report should say about it
    # the last forward at θ (the model source's stale steps), which the whole-model gradients
    # replay instead of a forward of their own; dropped once used
    tape: BlockTape | None = None
    # s: the bytes one sequence's forward with autograd keeps for its backward, measured on
    # ``sequences`` by the stale steps (`gradlens.sources.microbatch.probe`; the parameters'
    # values do not change it), which the whole-model gradients' memory plan takes as it is
    sequence_bytes: int | None = None


# (field, index) → the name of that entry as the user knows it; see `Origin`.
Namer = Callable[[str, tuple[int, ...]], str]


def plain_name(name: str, index: tuple[int, ...]) -> str:
    """'batch.advantages[1, 3]': a `Batch` field by its own name (a batch built in Python)."""
    return f"batch.{name}" + (f"[{', '.join(map(str, index))}]" if index else "")


@dataclass(frozen=True)
class Origin:
    """Where the tensors of a batch came from, so that every message names them as the user
    gave them (`gradlens.validation`).

    Attributes:
        name: (field, index) → the name of that entry: the batch file's key
            (``source.path batch.pt: 'advantages'[1, 3]``), the literal position's path
            (``source.sequences[1].positions[3].advantage``), or the synthetic setting that
            made it. ``field`` is a `Batch` attribute; ``index`` is (sequence, position) for
            the [N, T] tensors, (sequence, position, column) for ``hidden``, (row, column) for
            ``weight``, and () for the tensor as a whole.
        computed: the fields a model computed rather than the user gave (the model source's
            hidden states and log-probs, hidden states a checkpoint recomputed): what is wrong
            there is a finding of the report, not an input error.
    """

    name: Namer = plain_name
    computed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class VocabRows:
    """Rows [start, stop) of a vocabulary of ``vocab`` rows: the part of the lm_head weight one
    tensor-parallel rank holds."""

    start: int
    stop: int
    vocab: int


@dataclass(frozen=True)
class KeptSets:
    """The rollout's sampling support: the set K_t of tokens top-p / top-k left to sample from.

    Sampling drew y_t from μ̃_t = μ_t restricted to K_t and renormalised. With
    ``loss.sampling_support: kept`` the losses use π̃_t the same way (`gradlens.grads`), and each
    stored log-prob q is read as log q̃(y) = log q(y) − log S^q_t, S^q_t = Σ_{v∈K_t} q_t,v.

    Attributes:
        ids: [N, T, K] int64, the ids of K_t, −1 as padding (K: the largest |K_t|).
        rule: how K_t was chosen (``top-p 0.9``, ``top-k 50``, ``batch file``).
        old_log_mass: [N, T] log S^old_t, π_old's mass of K_t; None: ``old_logp`` is already
            of π̃_old (a trainer that replays the mask records it so).
        rollout_log_mass: [N, T] log S^μ_t, the rollout pass's mass of K_t; None: the stored
            ``rollout_logp`` is already of μ̃ (an engine's processed log-probs).
        ref_log_mass: [N, T] log S^ref_t of the reference policy; None: as ``old_log_mass``.
    """

    ids: Tensor
    rule: str
    old_log_mass: Tensor | None = None
    rollout_log_mass: Tensor | None = None
    ref_log_mass: Tensor | None = None

    def counts(self) -> Tensor:
        """[N, T] |K_t|."""
        return (self.ids >= 0).sum(-1)

    def valid_ids(self, rows: Tensor, cols: Tensor) -> Tensor:
        """[M, K] the kept ids of the valid tokens (row-major, as `valid_index`)."""
        return self.ids[rows, cols]


@dataclass(frozen=True)
class Teacher:
    """The teacher of a distillation term (`gradlens.losses.distill`), in one or both forms.

    Attributes:
        hidden: [N, T, H'] the teacher's final hidden states, and
        weight: [V, H'] its lm_head (the same vocabulary as the student's): q_t = softmax(W' h'_t),
        bias: [V] its lm_head bias b' when it has one: q_t = softmax(W' h'_t + b').
        logits: [N, T, V] the teacher's logits themselves, instead of a hidden/weight pair.
        topk_ids: [N, T, K] int64 the teacher's top-k ids K_t, and
        topk_logp: [N, T, K] their stored log q_t(v) (not renormalised over K_t).
        sampled_logp: [N, T] log q_t(y_t) of the sampled token (on-policy distillation's
            ℓ_teacher), when known.
    """

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logp: Tensor | None = None
    sampled_logp: Tensor | None = None

    @property
    def has_pair(self) -> bool:
        return self.hidden is not None and self.weight is not None

    @property
    def has_full(self) -> bool:
        """The teacher's whole distribution q_t is known: a hidden/weight pair, or its logits."""
        return self.has_pair or self.logits is not None

    @property
    def vocab_size(self) -> int | None:
        """V of the teacher's full distribution, when it has one."""
        if self.logits is not None:
            return int(self.logits.shape[-1])
        return None if self.weight is None else int(self.weight.shape[0])

    @property
    def has_topk(self) -> bool:
        return self.topk_ids is not None and self.topk_logp is not None


@dataclass(frozen=True)
class Batch:
    """Everything a loss and the lm_head diagnostics need.

    Attributes:
        hidden: [N, T, H] final hidden states h_t (the lm_head input), in the operand dtype.
        weight: [V, H] lm_head weight W, so that the logits are z_t = W h_t.
        tokens: [N, T] int64 sampled tokens y_t.
        mask: [N, T] bool, True at the positions that enter the loss.
        old_logp: [N, T] log π_old(y_t), the behaviour policy of the PPO ratio.
        advantages: [N, T] advantage A_t (constant: no gradient flows into it).
        rollout_logp: [N, T] log μ_old(y_t) from the inference engine, if the source has one.
        ref_logp: [N, T] log π_ref(y_t) of a reference policy (KL penalties), if any.
        on_policy: [N, T] bool, True where π_old is π_θ by construction (no drift, or a literal
            position without an old probability): there ℓ_old is taken to be ℓ itself, so
            r = 1 exactly whatever the rounding of the path that computes ℓ.
        source: a short description of where the batch came from.
        advantage_note: how the advantages were obtained (raw reward, group-normalised, ...).
        model_context: the checkpoint the batch came from, for the whole-model gradients and
            the model sections of the report; None for sources without a model.
        groups: [N] int64 prompt-group id of each sequence (the completions of one prompt share
            an id), or None when the source does not know them. Group-coupled losses (``real``)
            need it.
        weight_rows: under tensor parallelism, the rows of the whole [V, H] weight that
            ``weight`` [V_r, H] holds (``vocab_size`` is then V, not V_r); None: the whole W.
        kept: the rollout's kept sets K_t (top-p / top-k), when the source recorded them.
            Every logit path restricts π to them only in a batch that `gradlens.grads.replay`
            returned (``replayed``); the compare pipeline makes it under
            ``loss.sampling_support: kept``.
        replayed: the stored log-probs are already of the renormalised distributions and the
            losses use π̃ = π on K_t, renormalised.
        tokenizer: what decodes the token ids (anything with ``decode(list[int]) -> str``), when
            the source knows one beside ``model_context``'s (a batch file's
            ``source.tokenizer`` or checkpoint, the Python API's ``tokenizer=``); None: none.
        origin: how the source names each tensor, for the messages of `gradlens.validation`.
        teacher: the teacher of the distillation term and of on-policy distillation, if any.
    """

    hidden: Tensor
    weight: Tensor
    tokens: Tensor
    mask: Tensor
    old_logp: Tensor
    advantages: Tensor
    rollout_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    on_policy: Tensor | None = None
    source: str = ""
    advantage_note: str = ""
    model_context: ModelContext | None = None
    groups: Tensor | None = None
    weight_rows: VocabRows | None = None
    kept: KeptSets | None = None
    replayed: bool = False
    tokenizer: Any = None
    origin: Origin = field(default_factory=Origin)
    teacher: Teacher | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.mask.shape[0])

    @property
    def teacher_logp(self) -> Tensor | None:
        """[N, T] log q(y_t) of the distillation teacher, when the batch has one."""
        return None if self.teacher is None else self.teacher.sampled_logp

    @property
    def vocab_size(self) -> int:
        """V of the whole lm_head (also when ``weight`` holds only some of its rows)."""
        if self.weight_rows is not None:
            return self.weight_rows.vocab
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class TokenInputs:
    """What a loss sees: per-token log-probs on the [N, T] grid.

    ``logp`` may require grad (the autograd reference differentiates through it); every other
    tensor is a constant. Values at masked positions are zeros, so no loss can produce a
    non-finite number there. ``entropy`` and ``groups`` are None where the caller does not
    provide them; a loss that needs one says so with a `GradlensError`.
    """

    logp: Tensor  # [N, T] log π_θ(y_t)
    old_logp: Tensor  # [N, T] log π_old(y_t)
    advantages: Tensor  # [N, T]
    mask: Tensor  # [N, T] bool
    rollout_logp: Tensor | None = None  # [N, T] log μ_old(y_t)
    ref_logp: Tensor | None = None  # [N, T] log π_ref(y_t)
    teacher_logp: Tensor | None = None  # [N, T] log q(y_t) of a distillation teacher
    entropy: Tensor | None = None  # [N, T] H(π_θ,t), detached (token selection, aspo)
    groups: Tensor | None = None  # [N] int64 prompt-group id of each sequence (real)


@dataclass(frozen=True)
class LossTerms:
    """A loss's answer for one batch, before aggregation.

    Attributes:
        per_token: [N, T] per-token loss (minimised), differentiable in ``TokenInputs.logp``;
            zero at masked positions.
        per_token_grad: [N, T] g_t = ∂(per-token loss)/∂ℓ_t in closed form, detached; the logit
            gradient of the aggregated loss is c_t·(e_y − π_t) with the coefficient c_t = a_t·g_t.
        regions: named [N, T] bool masks of the tokens a rule switched off or singled out
            (``clip_upper``, ``clip_lower``, ``clip_dual``, ``seq_masked``); the clipping
            diagnostic turns them into fractions. A loss without such rules returns none.
            Names starting with ``seq_`` are whole-sequence rules: their share of sequences is
            reported too.
        penalty: [N, T] the part of ``per_token`` that is a penalty (``grpo``'s β·KL), and
        penalty_grad: its part of ``per_token_grad``. Training–inference corrections
            weight the policy part only, as every framework adds the KL after the IS weight.
        sequence_level: ``per_token`` is one value per sequence, repeated on its tokens and
            differentiable through all of them (GSPO). ``per_token_grad`` is then exact for every
            aggregation whose weight is constant within a sequence (all of gradlens's).
        self_aggregated: the loss aggregated itself (user and verl-shaped functions):
            L = Σ per_token with weight 1, and ``per_token_grad`` is c_t itself.
        token_metrics: named [N, T] per-token values (e.g. ``kl``) that the report aggregates
            with the run's aggregation weights.
        reported: numbers the loss function reported itself (a verl-shaped function's metrics).
    """

    per_token: Tensor
    per_token_grad: Tensor
    regions: dict[str, Tensor] = field(default_factory=dict)
    penalty: Tensor | None = None
    penalty_grad: Tensor | None = None
    sequence_level: bool = False
    self_aggregated: bool = False
    token_metrics: dict[str, Tensor] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)


def valid_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices (n, t) of the valid tokens, in row-major order: M each."""
    n, t = torch.nonzero(mask, as_tuple=True)
    return n, t
