"""Configuration: YAML + dotted overrides → one validated, frozen `Config`.

Precedence: command-line flags > ``--set key=value`` overrides > the YAML file > the defaults
written here (the built-in default run needs no file). Every problem is reported at once, each
with its dotted path, what was wrong and what is allowed. Nothing inside the maths reads this
module: `LossConfig.params` and the compare pipeline turn it into plain arguments.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gradlens.batchfile import SUFFIXES as BATCH_SUFFIXES
from gradlens.errors import GradlensError, unknown_name_message
from gradlens.files import read_text
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.base import Correction, Distill
from gradlens.losses.corrections import KINDS as CORRECTION_KINDS
from gradlens.losses.corrections import correction_problem, with_defaults
from gradlens.losses.external import is_external
from gradlens.losses.frameworks.conventions import CONVENTIONS
from gradlens.losses.grpo import KL_ESTIMATORS
from gradlens.losses.minirl import TRUNCATIONS
from gradlens.losses.split import Split

# The dtype names of the config (``dtype``, ``source.rollout_dtype``) and what they mean.
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES_OF = {v: k for k, v in DTYPES.items()}  # torch dtype → its name in the config


def _leaf_types(annotation: Any) -> set[Any]:
    """The types an annotation is made of: ``int | list[float] | None`` → {int, float, None}."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    if typing.get_origin(annotation) is Annotated:
        return _leaf_types(args[0])
    return set().union(*(_leaf_types(a) for a in args))


def _numbers_only(annotation: Any) -> bool:
    """Whether a field takes numbers and no booleans (``float | None``, ``list[int]``)."""
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


def _takes_text(annotation: Any) -> bool:
    """Whether a field takes a string anywhere in it (``str``, a ``Literal["auto"]``)."""
    return any(leaf is str or isinstance(leaf, str) for leaf in _leaf_types(annotation))


def _not_a_number(value: Any, text_allowed: bool) -> str | None:
    """ "boolean" or "string" for the first such value in ``value`` (a list of lists walked) where
    a number goes, or None; mappings are sections, checked by theirs."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str) and not text_allowed:
        return "string"
    if isinstance(value, (list, tuple)):
        return next((w for v in value if (w := _not_a_number(v, text_allowed))), None)
    return None


class Strict(BaseModel):
    """Unknown keys are errors; parsed configs are immutable; every number is finite (a NaN
    or an infinity in a setting is an error naming it, never a batch of NaNs) and no number is
    a boolean or a string (pydantic would read ``seed: true`` as 1, ``token: true`` as token 1,
    ``seed: '5'`` as 5: a quoted number is a typo as often as not)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        marked = None
        for name, field in cls.model_fields.items():
            key = field.alias or name
            value = data.get(key)
            if value is None or not _numbers_only(field.annotation):
                continue  # walked only for numbers (an alias bomb elsewhere: not)
            wrong = _not_a_number(value, _takes_text(field.annotation))
            if wrong is not None:
                marked = dict(data) if marked is None else marked
                whole = float not in _leaf_types(field.annotation)
                marked[key] = NotANumber(value, wrong, "an integer" if whole else "a number")
        return data if marked is None else marked


class NotANumber:
    """A boolean or a string where a number goes, put in its place by `Strict` so that the
    field fails its own validation (every other field is still checked, and every problem
    reported at once) and `format_error` says what it was."""

    def __init__(self, value: Any, wrong: str, kind: str) -> None:
        self.value, self.wrong, self.kind = value, wrong, kind

    def __repr__(self) -> str:  # as YAML wrote it; a string quoted as the other messages do
        return repr(self.value) if isinstance(self.value, str) else json.dumps(self.value)

    def message(self) -> str:
        return f"Input should be {self.kind}, not a {self.wrong} (got {self!r})"


# ----------------------------------------------------------------------------- sources


class DriftConfig(Strict):
    """How π_old differs from π_θ in the synthetic source.

    ``none``: on-policy, π_old = π_θ. ``logit_noise``: z_old = z + scale·ε, ε ~ N(0, 1) per
    logit (log-ratio noise). ``stale_weight``: W_old = W + scale·std(W)·ε, a stale copy of the
    lm_head.
    """

    kind: Literal["none", "logit_noise", "stale_weight"] = "logit_noise"
    scale: float = Field(1.0, ge=0, description="noise scale of the drift")


class RewardConfig(Strict):
    """Per-sequence rewards of the synthetic source: Bernoulli(p_correct) or N(0, 1)."""

    kind: Literal["binary", "gaussian"] = "binary"
    p_correct: float = Field(0.5, gt=0, lt=1, description="P(reward = 1) for binary rewards")


class SyntheticSource(Strict):
    """Seeded random hidden states, lm_head and rollouts (see gradlens.sources.synthetic)."""

    kind: Literal["synthetic"] = "synthetic"
    num_sequences: int = Field(16, ge=1)
    group_size: int = Field(4, ge=1, description="sequences per prompt group (advantages)")
    min_length: int = Field(16, ge=1)
    max_length: int = Field(64, ge=1)
    vocab_size: int = Field(2048, ge=2)
    hidden_size: int = Field(64, ge=1)
    entropy: float | None = Field(0.5, gt=0, description="target mean entropy of π_θ, nats")
    temperature: float | None = Field(None, gt=0, description="or: divide N(0,1) logits by this")
    drift: DriftConfig = DriftConfig()
    rewards: RewardConfig = RewardConfig()
    rollout_drift: float | None = Field(
        None, ge=0, description="μ_old: z_μ = z_old + scale·ε, tokens ~ μ_old; null: no μ_old"
    )
    ref_drift: float | None = Field(
        None, ge=0, description="π_ref: z_ref = z + scale·ε; null: no reference policy"
    )
    teacher: Literal["none", "perturbed"] = Field(
        "none",
        description="a distillation teacher (loss.distill, opd): perturbed: q = softmax(W'h) "
        "with W' = W + teacher_scale·std(W)·ε; none: no teacher",
    )
    teacher_scale: float = Field(
        0.1,
        ge=0,
        description="σ of the perturbed teacher's lm_head (0.1: KL(q‖π) ≈ 0.3 nats on the "
        "default batch)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticSource:
        problems = []
        if self.min_length > self.max_length:
            problems.append(f"min_length ({self.min_length}) > max_length ({self.max_length})")
        if (self.entropy is None) == (self.temperature is None):
            problems.append("set exactly one of entropy and temperature (the other to null)")
        if self.entropy is not None and self.entropy >= math.log(self.vocab_size):
            problems.append(
                f"entropy {self.entropy} must be below log(vocab_size) = "
                f"{math.log(self.vocab_size):.4f}, the entropy of the uniform distribution"
            )
        if self.num_sequences % self.group_size:
            problems.append(
                f"num_sequences ({self.num_sequences}) must be a multiple of group_size "
                f"({self.group_size})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def check_probs(probs: list[float], name: str, total: bool) -> None:
    """Probabilities in (0, 1]; with ``total`` summing to 1 within 1e-6 (else at most that)."""
    bad = [p for p in probs if not 0 < p <= 1]
    if bad:
        raise ValueError(f"{name} must lie in (0, 1]; got {bad[0]}")
    if total and abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (within 1e-6); they sum to {sum(probs)}")
    if not total and sum(probs) > 1 + 1e-6:
        raise ValueError(f"{name} must sum to at most 1; they sum to {sum(probs)}")


class LiteralPosition(Strict):
    """One position stated literally: its distribution, sampled token, π_old and advantage."""

    token: int = Field(ge=0, description="the sampled token y")
    logits: list[float] | None = Field(None, description="z; or give probs")
    probs: list[float] | None = Field(None, description="π = softmax(z), each in (0, 1]")
    old_prob: float | None = Field(None, gt=0, le=1, description="π_old(y); default π_θ(y)")
    old_logp: float | None = Field(None, le=0, description="log π_old(y), instead of old_prob")
    advantage: float = 0.0
    rollout_prob: float | None = Field(None, gt=0, le=1, description="μ_old(y); default π_old(y)")
    rollout_logp: float | None = Field(None, le=0, description="log μ_old(y), or rollout_prob")
    ref_prob: float | None = Field(None, gt=0, le=1, description="π_ref(y); default π_old(y)")
    ref_logp: float | None = Field(None, le=0, description="log π_ref(y), or ref_prob")
    teacher_logits: list[float] | None = Field(
        None, description="the distillation teacher's logits z' (loss.distill); or teacher_probs"
    )
    teacher_probs: list[float] | None = Field(None, description="the teacher's q, each in (0, 1]")
    teacher_topk_ids: list[int] | None = Field(
        None, description="the teacher's stored top-k ids (form top_k), with teacher_topk_probs"
    )
    teacher_topk_probs: list[float] | None = Field(
        None, description="q at teacher_topk_ids, each in (0, 1] (not renormalised)"
    )
    teacher_logp: float | None = Field(
        None, le=0, description="log q(y) for opd; default: from teacher_logits/teacher_probs"
    )

    @model_validator(mode="after")
    def _rollout_and_ref(self) -> LiteralPosition:
        for a, b in (("rollout_prob", "rollout_logp"), ("ref_prob", "ref_logp")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give at most one of {a} and {b}")
        return self

    @model_validator(mode="after")
    def _one_of(self) -> LiteralPosition:
        if (self.logits is None) == (self.probs is None):
            raise ValueError("give exactly one of logits and probs")
        if self.old_prob is not None and self.old_logp is not None:
            raise ValueError("give at most one of old_prob and old_logp")
        values = self.logits if self.logits is not None else self.probs
        assert values is not None
        if len(values) < 2:
            raise ValueError(f"the distribution needs at least 2 entries (got {len(values)})")
        if not all(math.isfinite(v) for v in values):
            raise ValueError("logits and probs must be finite numbers")
        if self.probs is not None:
            bad = [p for p in self.probs if not 0 < p <= 1]
            if bad:
                raise ValueError(f"probs must lie in (0, 1]; got {bad[0]}")
            if abs(sum(self.probs) - 1) > 1e-6:
                raise ValueError(
                    f"probs must sum to 1 (within 1e-6); they sum to {sum(self.probs)}"
                )
        if self.token >= len(values):
            raise ValueError(f"token {self.token} is outside the vocabulary of size {len(values)}")
        return self

    @model_validator(mode="after")
    def _teacher(self) -> LiteralPosition:
        if self.teacher_logits is not None and self.teacher_probs is not None:
            raise ValueError("give at most one of teacher_logits and teacher_probs")
        full = self.teacher_logits if self.teacher_logits is not None else self.teacher_probs
        if full is not None:
            if len(full) != self.vocab_size:
                raise ValueError(
                    f"the teacher's distribution has {len(full)} entries and the student's "
                    f"{self.vocab_size}: distillation needs one vocabulary"
                )
            if not all(math.isfinite(v) for v in full):
                raise ValueError("teacher_logits and teacher_probs must be finite numbers")
            if self.teacher_probs is not None:
                check_probs(self.teacher_probs, "teacher_probs", total=True)
        ids, probs = self.teacher_topk_ids, self.teacher_topk_probs
        if (ids is None) != (probs is None):
            raise ValueError("give teacher_topk_ids and teacher_topk_probs together")
        if ids is not None and probs is not None:
            if not ids or len(ids) != len(probs):
                raise ValueError(
                    f"teacher_topk_ids ({len(ids)}) and teacher_topk_probs ({len(probs)}) need "
                    "the same number (≥ 1) of entries"
                )
            check_probs(probs, "teacher_topk_probs", total=False)
        return self

    @property
    def vocab_size(self) -> int:
        values = self.logits if self.logits is not None else self.probs
        return len(values or ())

    @property
    def teacher_full(self) -> list[float] | None:
        """The teacher's logits z' (log q for ``teacher_probs``), when stated."""
        if self.teacher_probs is not None:
            return [math.log(p) for p in self.teacher_probs]
        return self.teacher_logits


class LiteralSequence(Strict):
    positions: list[LiteralPosition] = Field(
        min_length=1, description="the sequence's positions, each {probs or logits, token, ...}"
    )
    group: int | None = Field(
        None, description="prompt group id (group-coupled losses: real); null: not stated"
    )


class LiteralSource(Strict):
    """Every position written out, for hand-computed cases (see gradlens.sources.literal)."""

    kind: Literal["literal"]
    sequences: list[LiteralSequence] = Field(
        min_length=1,
        description="the sequences, each a list of positions: {probs or logits, token, "
        "advantage, ...} (docs/cli.md, literal source)",
    )

    @model_validator(mode="after")
    def _same_vocab(self) -> LiteralSource:
        sizes = {p.vocab_size for s in self.sequences for p in s.positions}
        if len(sizes) > 1:
            raise ValueError(
                f"every position needs the same vocabulary size; got sizes {sorted(sizes)}"
            )
        stated = [s.group is not None for s in self.sequences]
        if any(stated) and not all(stated):
            raise ValueError("state group on every sequence or on none")
        positions = [p for s in self.sequences for p in s.positions]
        for what, has in (
            ("teacher_logits or teacher_probs", lambda p: p.teacher_full is not None),
            ("teacher_topk_ids", lambda p: p.teacher_topk_ids is not None),
            ("teacher_logp", lambda p: p.teacher_logp is not None),
        ):
            given = [has(p) for p in positions]
            if any(given) and not all(given):
                raise ValueError(f"state {what} on every position or on none")
        ks = {len(p.teacher_topk_ids) for p in positions if p.teacher_topk_ids is not None}
        if len(ks) > 1:
            raise ValueError(
                f"every position's teacher_topk_ids needs the same K; got sizes {sorted(ks)}"
            )
        return self


class StaleConfig(Strict):
    """Optimizer steps on the rollout batch before the diagnosis (model source): π_θ ≠ π_old.

    With ``target_kl`` (the default) the learning rate is a first guess: each step is redone
    with a rescaled learning rate until the KL of π_θk against π_old reaches k/N of the target,
    so the same setting means the same distance on any model (gradlens.sources.staleness).
    """

    steps: int = Field(2, ge=0, description="N: optimizer steps between rollout and diagnosis")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(
        5e-5,
        gt=0,
        description="learning rate of the stale steps; with target_kl, the first step's first "
        "guess, rescaled until the target is met",
    )
    target_kl: float | None = Field(
        0.01,
        gt=0,
        description="KL(π_old‖π_θN), the k3 estimate over the completion tokens, that the N steps "
        "reach (within a factor 1.5); the learning rate is searched step by step. null: lr as "
        "given, however far it moves the model",
    )
    loss: str = Field("ppo_clip", description="the registered loss the stale steps minimise")
    grad_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto",
        description="precision of the stale steps' backward: the transformer blocks recomputed "
        "for it run under autocast in bfloat16 and the lm_head's backward products take bf16 "
        "operands (as a mixed-precision trainer computes gradients), while every forward — "
        "π_old, π_θk, the loss — and the diagnosis stay in the model's dtype; model: the "
        "backward in the model's dtype too; auto: bfloat16 for a float32 model on a device that "
        "computes bf16 natively (as rollout_dtype), the model's dtype elsewhere",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        problems = loss_name_problems([value])  # a registered loss, or module:function
        if problems:
            raise ValueError("; ".join(problems))
        return value


class ModelSource(Strict):
    """A causal LM: rollouts sampled from it, real staleness and precision drift.

    See gradlens.sources.model. ``path: null`` is the built-in tiny model shipped with gradlens.
    """

    kind: Literal["model"]
    path: str | None = Field(None, description="local Hugging Face checkpoint dir; null: built-in")
    prompts: list[str] | None = Field(
        None,
        description="prompts; null: drawn from a built-in set (Python def/class lines, or "
        "instructions with chat_template)",
    )
    num_prompts: int = Field(4, ge=1, description="prompts drawn from the built-in set")
    group_size: int = Field(4, ge=1, description="completions sampled per prompt")
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature T (logits / T)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(
        0, ge=0, description="sample from the k most probable tokens (before top-p); 0: off"
    )
    reward: str | None = Field(
        None,
        description="built-in reward name or module:function; null: python_syntax, or "
        "word_limit with chat_template",
    )
    rollout_dtype: Literal["auto", "float64", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="precision of the rollout pass that samples and returns μ; auto: bfloat16 "
        "where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16, AMX or "
        "Arm BF16), float32 elsewhere (emulated bf16 is slower than float32)",
    )
    rollout_logprobs: Literal["cache", "full"] = Field(
        "cache",
        description="where μ comes from: cache, the sampler's log-probs, one position at a "
        "time against a key-value cache (an inference engine's); full, one forward over each "
        "whole sampled sequence of the same rollout model (gradlens.sources.passes)",
    )
    train_pass: Literal["batch", "alone"] = Field(
        "batch",
        description="how the training pass scores the sequences for π_old: batch, together "
        "in padded micro-batches (a trainer's); alone, each sequence by itself without "
        "padding (the batch-composition effect of TRL issue 6789; gradlens.sources.passes)",
    )
    shared_prefix: bool = Field(
        True,
        description="the training passes (π_old, the stale steps, the whole-model gradients, "
        "a distillation teacher's forward) put the completions of one prompt in one row after "
        "a single copy of it, each "
        "attending to the prompt and itself only (a 4D attention mask): the padded batch's "
        "numbers up to rounding, for the prompt computed once per group instead of once per "
        "completion; used where it saves positions and the model's forward is checked to "
        "honour the mask (gradlens.sources.shared_prefix); false: the padded batch",
    )
    chat_template: bool = Field(
        False,
        description="wrap each prompt as a user message in the tokenizer's chat template "
        "(instruct and chat checkpoints); null prompts are then the built-in instructions",
    )
    stale: StaleConfig = StaleConfig()
    teacher_path: str | None = Field(
        None,
        description="a second local checkpoint with the same vocabulary: the distillation "
        "teacher (loss.distill, opd), run on the same sequences; 'builtin': the shipped tiny "
        "model; null: no teacher",
    )

    @field_validator("teacher_path")
    @classmethod
    def _teacher_path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("teacher_path is empty; give a checkpoint directory, builtin or null")
        return value

    device_map: Literal["auto"] | dict[str, str | int] | None = Field(
        None,
        description="where from_pretrained places the checkpoint's modules (accelerate's "
        "device_map): auto, or {module: cpu|disk|cuda:N|N}; disk offloads to a temporary folder; "
        "one placement (cpu, cuda:N, N) is the whole model's, {'': placement}. null: the whole "
        "model on the run's device",
    )

    @field_validator("device_map", mode="before")
    @classmethod
    def _whole_model_placement(cls, value: Any) -> Any:
        """One placement for the whole model, as transformers takes it (``device_map: cpu``),
        is accelerate's {"": placement}; ``auto`` and a mapping stay as they are (a boolean is
        refused before this, as every number's)."""
        index = isinstance(value, int) and not isinstance(value, bool)
        if index or (isinstance(value, str) and value != "auto"):
            if isinstance(value, str) and not value.strip():
                raise ValueError("device_map is empty; give auto, a device, or {module: device}")
            return {"": value}
        return value

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one prompt, or null for the built-in corpus")
        return value

    @model_validator(mode="after")
    def _placeable(self) -> ModelSource:
        stale = self.stale
        teacherless = stale.steps > 0 and self.teacher_path is None
        if (
            teacherless
            and not is_external(stale.loss)
            and "teacher_logp" in get_loss(stale.loss).needs
        ):
            raise ValueError(
                f"stale.loss: {stale.loss} needs the teacher's log q(y), and there is no "
                "source.teacher_path: its log q(y) would be ℓ_old, A = ℓ_old − ℓ = 0 at "
                "θ_old, and the stale steps would not move; set source.teacher_path or "
                "another stale.loss"
            )
        dm = self.device_map
        if isinstance(dm, dict) and "disk" in dm.values() and self.stale.steps > 0:
            raise ValueError(
                "device_map: modules offloaded to disk live on the meta device between forward "
                f"passes, and the optimizer cannot step them; stale.steps is {self.stale.steps}: "
                "set it to 0, or place every module on cpu or a device"
            )
        return self


class BatchSource(Strict):
    """A rollout batch dumped from a training run (see gradlens.batchfile for the keys).

    The file stores the final hidden states and the lm_head weight, or ``model_path`` names a
    checkpoint that recomputes them from the file's prompt and response token ids
    (gradlens.sources.recompute); ``model_path: builtin`` is the tiny model shipped with
    gradlens (``./builtin`` for a directory of that name). With a checkpoint, every loss also
    runs through the whole model (``whole_model``, on unless set false).
    """

    kind: Literal["batch"]
    path: str = Field(description="a .safetensors, .pt or .jsonl batch file")
    group_size: int = Field(
        1,
        ge=1,
        description="sequences per prompt, when the file has rewards; when set, also the prompt "
        "groups of group-coupled losses (real)",
    )
    model_path: str | None = Field(
        None,
        description="checkpoint dir that recomputes the hidden states from the file's token ids "
        "(it wins over stored hidden_states); 'builtin': the shipped tiny model; null: the "
        "file's hidden_states and lm_head_weight",
    )
    temperature: float = Field(
        1.0, gt=0, description="with model_path: the trainer's T, logits divided by it"
    )
    whole_model: bool | None = Field(
        None,
        description="with model_path: run every loss through the whole checkpoint too "
        "(per-tensor-group and total gradient norms; one forward with autograd over the whole "
        "batch); null: on when model_path is set",
    )
    tokenizer: str | None = Field(
        None,
        description="decodes the file's token ids in the report (attribution): a tokenizer "
        "directory, a tokenizer.json file or 'builtin'; null: model_path's tokenizer, or ids "
        "only",
    )
    shared_prefix: bool = Field(
        True,
        description="with model_path: the forwards (the recomputed hidden states, the "
        "whole-model gradients) put the responses to one prompt in one row after a single copy "
        "of it, where that saves positions and the model passes a packed-vs-padded check; "
        "false: the padded grid",
    )

    @model_validator(mode="after")
    def _model_settings(self) -> BatchSource:
        if self.model_path is not None and not self.model_path.strip():
            raise ValueError("model_path is empty; give a checkpoint directory, builtin or null")
        if self.model_path is None and self.whole_model:
            raise ValueError(
                "whole_model needs model_path: the whole-model gradients run through the "
                "checkpoint that recomputes the hidden states"
            )
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ValueError("tokenizer is empty; give a tokenizer directory, builtin or null")
        if self.model_path is None and self.temperature != 1.0:
            raise ValueError(
                "temperature applies only with model_path (recomputed hidden states); a file's "
                "hidden_states are used as stored, so fold 1/T into them"
            )
        return self

    @property
    def runs_whole_model(self) -> bool:
        """Whole-model gradients are computed: a checkpoint is set and not switched off."""
        return self.model_path is not None and self.whole_model is not False


Source = Annotated[
    Union[SyntheticSource, LiteralSource, ModelSource, BatchSource],  # noqa: UP007
    Field(discriminator="kind"),
]
SOURCE_SECTIONS: dict[str, type[Strict]] = {
    "synthetic": SyntheticSource,
    "literal": LiteralSource,
    "model": ModelSource,
    "batch": BatchSource,
}
SOURCE_KINDS = tuple(SOURCE_SECTIONS)


def known_name(kind: str, value: str, valid: Iterable[str]) -> str:
    """``value`` if it is one of ``valid``, else a ValueError with 'did you mean'."""
    names = list(valid)
    if value not in names:
        raise ValueError(unknown_name_message(kind, value, names))
    return value


# ----------------------------------------------------------------------------- the rest


class AdvantageConfig(Strict):
    """How rewards become advantages (ignored by the literal source, which states them)."""

    normalization: Literal["none", "group", "group_mean", "batch"] = "group"
    eps: float = Field(1e-6, gt=0, description="added to the std before dividing")


class CorrectionConfig(Strict):
    """One training–inference correction (gradlens.losses.corrections); null thresholds take
    the kind's defaults."""

    kind: str = Field(description="a correction kind (gradlens.losses.corrections.KINDS)")
    low: float | None = Field(None, ge=0, description="lower threshold on ρ; null: default")
    high: float | None = Field(None, gt=0, description="upper threshold on ρ; null: default")
    renormalize: bool = Field(
        False,
        description="rejected tokens leave the aggregation's normaliser too (verl's rejection "
        "sampling, rollout_rs); masking kinds only",
    )
    batch_normalize: bool = Field(
        False,
        description="divide the weight by its batch mean (verl rollout_is_batch_normalize); "
        "importance-weight kinds only",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        return known_name("correction kind", value, CORRECTION_KINDS)

    @model_validator(mode="after")
    def _ordered(self) -> CorrectionConfig:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        problem = correction_problem(self.resolved())
        if problem is not None:
            raise ValueError(problem)
        return self

    def resolved(self) -> Correction:
        """The plain `Correction`, unset thresholds at the kind's defaults."""
        return with_defaults(self.kind, self.low, self.high, self.renormalize, self.batch_normalize)


class DistillConfig(Strict):
    """The distillation term added to every loss (`gradlens.losses.base.Distill`, docs/losses.md
    §2.29); the teacher comes from the batch (teacher_hidden/teacher_weight, or stored top-k)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl KL(q‖π), reverse_kl KL(π‖q), jsd TRL's β-JSD"
    )
    form: Literal["full", "top_k"] = Field(
        "full",
        description="full: every vocabulary entry (a teacher hidden/weight pair); top_k: sums "
        "over the teacher's top-k ids only (verl forward_kl_topk)",
    )
    coef: float = Field(1.0, description="λ, the term's weight")
    beta: float = Field(0.5, ge=0, le=1, description="jsd's β; 0, 1: forward, reverse KL (TRL)")
    top_k: int = Field(8, ge=1, description="K of the top-k form taken from a teacher pair")
    log_prob_min_clamp: float | None = Field(
        None, le=0, description="verl's floor on log π and log q (verl default −10); null: none"
    )

    def params(self) -> Distill:
        return Distill(**self.model_dump())


class LossConfig(Strict):
    """Loss hyper-parameters, shared by every loss that uses them.

    Each field but ``aggregation``, ``loss_scale_factor``, ``count_empty_sequences`` and
    ``sampling_support`` is a field of `gradlens.losses.LossParams` with the same default
    (`params`); the first three are the run's `Aggregation` (`token_aggregation`), the last
    tells the compare pipeline to replay the batch's kept sets (`gradlens.grads.replay`).
    Nothing past this class reads the config.
    """

    eps_low: float = Field(0.2, ge=0, lt=1)
    eps_high: float = Field(0.28, ge=0)
    dual_clip: float | None = Field(None, gt=1, description="dual-clip c (> 1); null: off")
    opsm_delta: float | None = Field(None, ge=0, description="OPSM δ; null: no sequence mask")
    aggregation: str = "token_mean"
    loss_scale_factor: float | None = Field(
        None, gt=0, description="L of token_sum_norm, seq_mean_token_sum_norm; null: padded length"
    )
    count_empty_sequences: bool = Field(
        False,
        description="the seq_mean modes divide by every row B (TRL, verl's trainer), not by B', "
        "the sequences with a valid token",
    )
    tau_pos: float = Field(1.0, gt=0, description="SAPO gate temperature for A > 0")
    tau_neg: float = Field(1.05, gt=0, description="SAPO gate temperature for A ≤ 0")
    cispo_eps_low: float = Field(10.0, ge=0, description="cispo: weight ≥ 1 − this")
    cispo_eps_high: float = Field(0.28, ge=0, description="cispo: weight ≤ 1 + this")
    cispo_cap: float = Field(5.0, gt=0, description="cispo_cap: absolute cap ε_max (TRL)")
    kl_estimator: str = Field("k3", description="grpo's KL estimator: k1, k2, k3 or unbiased")
    kl_coef: float = Field(0.04, ge=0, description="grpo's β")
    minirl_cap: float = Field(5.0, gt=0, description="MiniRL truncation threshold C")
    minirl_truncation: str = Field(
        "literal", description="literal: min(π_θ/μ_old, C); decoupled: r·min(π_old/μ_old, C)"
    )
    entropy_coef: float = Field(0.0, description="c_H of the entropy bonus −c_H·H; 0: off")
    corrections: list[CorrectionConfig] = Field(
        default_factory=list, description="training–inference corrections on every loss"
    )
    distill: DistillConfig | None = Field(
        None, description="a distillation term to a teacher added to every loss; null: none"
    )
    sampling_support: Literal["full", "kept"] = Field(
        "full",
        description="kept: replay the rollout's top-p/top-k kept set K_t (DeepSeek-V3.2's keep "
        "sampling mask): every loss uses π restricted to K_t and renormalised, its logit gradient "
        "exactly 0 outside K_t; full: π over the whole vocabulary",
    )
    bypass_mode: bool = Field(
        False,
        description="verl's bypass mode: π_old := the rollout log-probs, corrections on π_θ/μ",
    )
    # --- the losses of docs/losses.md §2.14–§2.27 and the top-entropy token selection (§2.28);
    # each default is its `gradlens.losses.base.LossParams` twin's.
    dppo_tv_low: float = Field(0.15, ge=0, description="dppo_tv: mask A<0 ∧ π−π_old < −this")
    dppo_tv_high: float = Field(0.15, ge=0, description="dppo_tv: mask A>0 ∧ π−π_old > this")
    dppo_kl_low: float = Field(0.05, ge=0, description="dppo_kl: binary-KL bound for A < 0")
    dppo_kl_high: float = Field(0.05, ge=0, description="dppo_kl: binary-KL bound for A > 0")
    dppo_cap: float | None = Field(
        3.0, gt=0, description="DPPO's truncation C of min(r, C) (verl clip_ratio_c); null: none"
    )
    prime_mask_low: float = Field(0.2, ge=0, description="prime_rl: mask A<0 ∧ π−μ < −this")
    prime_mask_high: float = Field(0.2, ge=0, description="prime_rl: mask A>0 ∧ π−μ > this")
    prime_kl_tau: float = Field(1e-3, ge=0, description="prime_rl/prime_ipo: τ of τ(ℓ − ℓ_μ)²")
    ipo_threshold: float = Field(0.1, ge=0, description="prime_ipo: mask |π − μ| > this")
    m2po_threshold: float = Field(0.04, gt=0, description="m2po: τ_M2 of the second moment")
    aspo_eps_low_entropy: float = Field(
        0.2, ge=0, lt=1, description="aspo: clip width of the tokens at or below the quantile"
    )
    aspo_eps_high_entropy: float = Field(
        0.4, ge=0, lt=1, description="aspo: clip width of the tokens above the quantile"
    )
    aspo_entropy_quantile: float = Field(
        0.8, ge=0, le=1, description="aspo: per-sequence entropy quantile of the wide width"
    )
    aspo_clip_c_neg: float = Field(3.0, gt=1, description="aspo: dual clip c⁻ (A < 0)")
    aspo_clip_c_pos: float = Field(3.0, gt=1, description="aspo: soft dual clip c⁺ (A > 0)")
    gppo_beta1: float = Field(0.25, ge=0, description="ce_gppo: β₁ (A<0, r<1−eps_low)")
    gppo_beta2: float = Field(1.0, ge=0, description="ce_gppo: β₂ (A>0, r>1+eps_high)")
    clip_cov_ratio: float = Field(2e-4, gt=0, le=1, description="clip_cov: share switched off")
    clip_cov_lb: float = Field(1.0, description="clip_cov: covariance band, lower end")
    clip_cov_ub: float = Field(5.0, description="clip_cov: covariance band, upper end")
    selection_seed: int = Field(
        0, ge=0, lt=2**64, description="clip_cov: seed of its random selection"
    )
    kl_cov_ratio: float = Field(2e-4, gt=0, le=1, description="kl_cov: share penalised")
    kl_cov_coef: float = Field(0.1, ge=0, description="kl_cov: k of k·|ℓ − ℓ_old|")
    gmpo_eps_low: float = Field(0.4, ge=0, description="gmpo: log-space clip, lower")
    gmpo_eps_high: float = Field(0.4, ge=0, description="gmpo: log-space clip, upper")
    topr_pos_weight: float = Field(1.0, ge=0, description="topr: weight of A > 0 tokens")
    topr_neg_weight: float = Field(1.0, ge=0, description="topr: weight of A ≤ 0 tokens")
    dro_beta: float = Field(0.1, gt=0, description="dro: β of (β/2)(ℓ − ℓ_old)²")
    vespo_k_pos: float = Field(2.0, ge=0, description="vespo: k for A ≥ 0")
    vespo_lambda_pos: float = Field(3.0, gt=0, description="vespo: λ for A ≥ 0")
    vespo_k_neg: float = Field(3.0, ge=0, description="vespo: k for A < 0")
    vespo_lambda_neg: float = Field(2.0, gt=0, description="vespo: λ for A < 0")
    real_tau: float = Field(0.5, gt=0, description="real: temperature τ")
    fipo_decay_rate: float = Field(32.0, gt=0, description="fipo: half-life, γ = 2^(−1/this)")
    fipo_clip_range: float | None = Field(
        0.2, ge=0, description="fipo: weight clip [1, 1+this] (or [1−this, 1+this]); null: none"
    )
    fipo_clip_high_only: bool = Field(True, description="fipo: clip the weight to [1, 1+range]")
    fipo_safety_threshold: float | None = Field(
        4.0, gt=0, description="fipo: A<0 ∧ r > this ⇒ weight in [0.8, 1]; null: off"
    )
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="keep only the top ρ of tokens by entropy, any loss; 1: off"
    )

    @model_validator(mode="after")
    def _bands(self) -> LossConfig:
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})"
            )
        return self

    @field_validator("corrections")
    @classmethod
    def _distinct_corrections(cls, value: list[CorrectionConfig]) -> list[CorrectionConfig]:
        kinds = [c.kind for c in value]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a correction kind is named twice: {kinds}")
        return value

    @field_validator("aggregation")
    @classmethod
    def _known_aggregation(cls, value: str) -> str:
        return known_name("aggregation", value, AGGREGATIONS)

    @field_validator("kl_estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        return known_name("KL estimator", value, KL_ESTIMATORS)

    @field_validator("minirl_truncation")
    @classmethod
    def _known_truncation(cls, value: str) -> str:
        return known_name("MiniRL truncation", value, TRUNCATIONS)

    def params(self) -> LossParams:
        """The section as the plain `LossParams` every loss reads (any command)."""
        values = {name: getattr(self, name) for name in LOSS_PARAM_FIELDS}
        values["corrections"] = tuple(c.resolved() for c in self.corrections)
        values["distill"] = None if self.distill is None else self.distill.params()
        return LossParams(**values)

    def token_aggregation(self) -> Aggregation:
        """The run's token aggregation."""
        return Aggregation(self.aggregation, self.loss_scale_factor, self.count_empty_sequences)


LOSS_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(LossParams))


def _on_off(value: Any) -> Any:
    """YAML reads a bare on/off as a boolean: give the documented spelling back."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class DiagnosticsConfig(Strict):
    top_k: int = Field(10, ge=1, description="rows listed in the top-rows table")
    token_details: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto", description="per-token gradients in the output; auto: when tokens × vocab ≤ 4096"
    )
    engine: Literal["auto", "materialized", "streamed", "fused"] = Field(
        "auto",
        description="materialized: [M, V] gradients in memory; streamed: vocabulary chunks, "
        "nothing of size M×V or V×H kept (gradlens.engine); fused: the streamed engine with "
        "Triton kernels (CUDA, opt-in); auto: streamed above stream_above entries",
    )
    reference: Literal["auto", "autograd", "sampled", "none"] = Field(
        "auto",
        description="check against torch.autograd: autograd, every token and row; sampled, "
        "c_t of every token with ∂L/∂z_y of a sample of tokens and ‖∂L/∂W_v‖ of a sample of "
        "rows (no [tokens, vocab] under autograd); auto: autograd with the materialized engine, "
        "sampled with the streamed ones and under tensor_parallel > 1",
    )
    stream_above: int = Field(
        1 << 24,
        ge=0,
        description="engine auto: stream when tokens × vocabulary exceeds this (2^24 entries: "
        "64 MiB of float32 per [tokens, vocab] tensor)",
    )
    memory_budget_mib: float | None = Field(
        None,
        gt=0,
        description="working memory of the streamed engine, of a large synthetic batch's "
        "construction and of each micro-batch through a model (stale steps, whole-model "
        "gradients); null: 1/4 of free memory, at most 1 GiB for the engine and 2 GiB for a "
        "model pass",
    )
    vocab_chunk: int | None = Field(None, ge=1, description="streamed engine rows per chunk")
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="ranks the lm_head's vocabulary rows are split over (the vocab-parallel "
        "streamed engine, one process per rank: torchrun --nproc-per-node N); 1: one process",
    )
    collective_timeout_s: float = Field(
        300.0,
        gt=0,
        description="tensor_parallel > 1: seconds a rank waits in a collective for the others "
        "before it fails (a rank that raised or hangs then stops every rank)",
    )
    attribution: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="which sequences, tokens, loss terms and token groups carry the lm_head "
        "update, and the entropy change of one step (docs/attribution.md); auto: with the "
        "materialized engine, or with any engine when compare --plot draws it (the streamed "
        "engine pays about one more GEMM-equivalent per loss for it: set on); the fused engine "
        "has none",
    )

    @model_validator(mode="after")
    def _attribution(self) -> DiagnosticsConfig:
        if self.attribution == "on" and self.engine == "fused":
            raise ValueError(
                "attribution 'on' needs the materialized or streamed engine: the fused engine's "
                "kernels do not form the attribution sums; set engine streamed, or attribution "
                "auto or off"
            )
        return self

    @model_validator(mode="after")
    def _tensor_parallel(self) -> DiagnosticsConfig:
        if self.tensor_parallel == 1:
            return self
        problems = []
        if self.engine in ("materialized", "fused"):
            problems.append(
                f"engine {self.engine!r} runs in one process; tensor_parallel "
                f"{self.tensor_parallel} needs the streamed engine (engine: auto or streamed)"
            )
        if self.reference == "autograd":
            problems.append(
                f"reference 'autograd' differentiates through the whole lm_head, which no rank "
                f"holds under tensor_parallel {self.tensor_parallel}; set reference sampled "
                "(auto: the sampled check, which gathers only the sampled rows) or none, or run "
                "the full reference in one process (tensor_parallel 1)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def loss_name_problems(names: list[str]) -> list[str]:
    """Why each name is not a loss: unknown, or a user loss that cannot be resolved."""
    problems = []
    for name in names:
        if name in loss_names():
            continue
        if is_external(name):
            try:
                get_loss(name)
            except GradlensError as exc:
                problems.append(str(exc))
        else:
            problems.append(unknown_name_message("loss", name, loss_names()))
    return problems


class ParityConfig(Strict):
    """Pairs of losses compared on one batch (gradlens.compare.parity); ``--parity A,B``, once
    per pair."""

    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = Field(
        min_length=1, description="the pairs [A, B] compared, each A against its B"
    )
    tolerance: float | None = Field(
        None, gt=0, description="max |Δc_t| / max |c_t| allowed; null: the dtype's agreement tol"
    )

    @field_validator("pairs")
    @classmethod
    def _known(cls, value: list[list[str]]) -> list[list[str]]:
        names = list(dict.fromkeys(name for pair in value for name in pair))
        problems = loss_name_problems(names)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class SplitConfig(Strict):
    """The batch's gradient as a framework computes it under a split (gradlens.diagnostics.split,
    docs/split.md): ``--split micro=4,dp=2,ga=2 --convention verl``."""

    micro: int = Field(ge=1, description="sequences per micro-batch")
    dp: int = Field(1, ge=1, description="data-parallel ranks (gradients averaged)")
    ga: int = Field(1, ge=1, description="gradient-accumulation steps (gradients summed)")
    convention: str = Field(
        description="the framework's table: verl, verl_legacy, trl, openrlhf, ms_swift; "
        "FRAMEWORK:SETTING names the setting (trl:bnpo), else loss.aggregation picks it "
        "(compare --convention)"
    )

    @field_validator("convention")
    @classmethod
    def _known_convention(cls, value: str) -> str:
        name, sep, setting = value.partition(":")
        known_name("convention", name, CONVENTIONS)
        if sep:
            settings = [n for rule in CONVENTIONS[name].rules for n in rule.names]
            known_name(f"{name} setting", setting, settings)
        return value

    def plain(self) -> Split:
        """The split as plain numbers."""
        return Split(self.micro, self.dp, self.ga)


def parse_split(text: str) -> dict[str, int]:
    """``"micro=4,dp=2,ga=2"`` → {"split.micro": 4, "split.dp": 2, "split.ga": 2} (``--split``);
    a clear error for anything else."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("micro", "dp", "ga"):
            raise GradlensError(
                f"--split {text!r}: each part is micro=N, dp=N or ga=N, e.g. "
                f"micro=4,dp=2,ga=2 (got {part!r})"
            )
        if f"split.{key}" in out:
            raise GradlensError(f"--split {text!r}: {key} is given twice; give it once")
        try:
            out[f"split.{key}"] = int(value)
        except ValueError:
            raise GradlensError(
                f"--split {text!r}: {key} must be a whole number (got {value.strip()!r})"
            ) from None
    if "split.micro" not in out:
        raise GradlensError(f"--split {text!r}: give micro=N, the sequences per micro-batch")
    return out


def _numbers(section: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a dumped config section, nested ones too."""
    if isinstance(section, dict):
        for key, value in section.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(section, list):
        for i, value in enumerate(section):
            yield from _numbers(value, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(section, float):
        yield prefix.rstrip("."), section


class Config(Strict):
    """The whole run. Every field has a default: ``Config()`` is the built-in default run."""

    seed: int = Field(
        0,
        ge=0,
        lt=2**64,
        description="the random seed, 0 ≤ seed < 2⁶⁴ (what torch's generators take; they read "
        "a negative seed modulo 2⁶⁴, so −1 would repeat 2⁶⁴ − 1)",
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float64", "float32", "bfloat16"] = "float32"
    losses: list[str] = Field(default_factory=lambda: ["reinforce", "ppo", "ppo_clip", "sft"])
    source: Source = Field(default_factory=SyntheticSource)
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    parity: ParityConfig | None = Field(None, description="compare pairs of losses (--parity A,B)")
    split: SplitConfig | None = Field(
        None, description="the gradient under a framework's micro/dp/ga split (--split)"
    )

    @model_validator(mode="after")
    def _split_in_one_process(self) -> Config:
        if self.split is not None and self.diagnostics.tensor_parallel > 1:
            raise ValueError(
                f"split: runs in one process; diagnostics.tensor_parallel is "
                f"{self.diagnostics.tensor_parallel} (use 1 with split)"
            )
        return self

    @model_validator(mode="after")
    def _stale_grad_lowerable(self) -> Config:
        src = self.source
        lowered = isinstance(src, ModelSource) and src.stale.grad_dtype == "bfloat16"
        if lowered and self.dtype == "float64":
            raise ValueError(
                "source.stale.grad_dtype 'bfloat16': autocast lowers float32 products only, "
                "and this run's dtype is float64; use model or auto, or dtype float32"
            )
        return self

    @property
    def operand_dtype(self) -> torch.dtype:
        """The torch dtype of ``dtype``."""
        return DTYPES[self.dtype]

    @model_validator(mode="after")
    def _loss_settings_in_range(self) -> Config:
        """Every loss setting is a number of the dtype the losses compute in: float32 (the
        softmax dtype of a float32 or bfloat16 run) holds |x| ≤ 3.4e38 only."""
        if self.dtype == "float64":
            return self
        largest = torch.finfo(torch.float32).max
        problems = [
            f"loss.{key}: {value:g} is beyond float32's range (±{largest:.3g}), which the "
            f"losses of a {self.dtype} run compute in; use a smaller value or dtype float64"
            for key, value in _numbers(self.loss.model_dump())
            if abs(value) > largest
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _distillable(self) -> Config:
        if self.loss.distill is None:
            return self
        problems = []
        if self.diagnostics.engine == "fused":
            problems.append(
                "diagnostics.engine 'fused' does not carry the teacher's dense term; use "
                "materialized, streamed or auto"
            )
        if self.diagnostics.tensor_parallel > 1:
            problems.append(
                f"diagnostics.tensor_parallel {self.diagnostics.tensor_parallel}: the "
                "vocab-parallel engine does not carry the teacher's dense term; use 1"
            )
        if self.loss.sampling_support == "kept":
            problems.append("sampling_support 'kept': the term runs on the full vocabulary")
        if problems:
            raise ValueError("loss.distill: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _replayable(self) -> Config:
        if self.loss.sampling_support == "full":
            return self
        problems = []
        if self.diagnostics.engine == "fused":
            problems.append(
                "diagnostics.engine 'fused' does not restrict π to the kept sets; use "
                "materialized, streamed or auto"
            )
        if problems:
            raise ValueError("loss.sampling_support 'kept': " + "; ".join(problems))
        return self

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one loss")
        unknown = loss_name_problems(value)  # module:function names a user loss
        if unknown:
            raise ValueError("; ".join(unknown))
        if len(set(value)) != len(value):
            raise ValueError(f"a loss is named twice: {value}")
        return value


# ----------------------------------------------------------------------------- loading


def parse_override(text: str, option: str = "--set") -> tuple[list[str], Any]:
    """``'loss.eps_high=0.4'`` → (['loss', 'eps_high'], 0.4); the value is parsed as YAML.
    ``option`` is the command-line option that gave ``text``, named by the errors."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise GradlensError(f"{option} {text!r}: expected key=value, e.g. loss.eps_high=0.4")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise GradlensError(f"{option} {text!r}: empty component in the key {key!r}")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise GradlensError(
            f"{option} {text!r}: the value is not valid YAML ({yaml_problem(exc)})"
        ) from None
    return path, value


def repeated_value(values: list[Any]) -> int | None:
    """The index of the first value that an earlier one repeats (null too), or None."""
    return next((i for i, value in enumerate(values) if value in values[:i]), None)


def settings_grid(texts: Iterable[str]) -> list[dict[str, Any]]:
    """``["loss.aggregation=[token_mean, seq_mean_token_mean]", "loss.dual_clip=[null, 3]"]``
    → every combination, ``[{"loss.aggregation": "token_mean", "loss.dual_clip": None}, ...]``
    (the first key varies slowest)."""
    keys, choices = [], []
    for text in texts:
        path, value = parse_override(text, "--parity-matrix")
        key = ".".join(path)
        if not isinstance(value, list) or not value:
            raise GradlensError(
                f"--parity-matrix {text!r}: give the values as a YAML list, e.g. "
                f"{key}=[token_mean, seq_mean_token_mean]"
            )
        if key in keys:
            raise GradlensError(f"--parity-matrix: {key} is given twice")
        if path[0] == "parity":  # the matrix runs the pairs of --parity, not others
            raise GradlensError(
                f"--parity-matrix {text!r}: the matrix varies the settings the pairs run under; "
                "the pairs themselves are --parity A,B"
            )
        twice = repeated_value(value)
        if twice is not None:
            raise GradlensError(
                f"--parity-matrix {text!r}: {value[twice]!r} is given twice; each value makes "
                "one row"
            )
        keys.append(key)
        choices.append(value)
    if not keys:
        return []  # no matrix: not one run with no settings
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating sections as needed."""
    node = data
    for i, part in enumerate(path[:-1]):
        if node.get(part) is None:  # absent, or a section given as null (unset): start one
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise GradlensError(f"--set {'.'.join(path)}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: YAML would keep the last
    silently, and a section given twice would lose every key of the first."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:  # the keys written here; a merged (<<) one may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first
        except TypeError:  # an unhashable key: construct_mapping refuses it below
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found the key {key!r} a second time (first on line {first[key] + 1})",
                key_node.start_mark,
            )
        first[key] = key_node.start_mark.line
    loader.flatten_mapping(node)  # then the merge keys, as SafeLoader does
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.1 (PyYAML) reads a float only with a dot, so `lr: 1e-5` would be the string '1e-5';
# YAML 1.2 and JSON read it as a number, and so does gradlens (`Strict` refuses strings where
# numbers go).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_problem(exc: yaml.YAMLError, added: int = 0) -> str:
    """A YAML error on one line, e.g. "line 3, column 1: expected ',' or ']', but got '<stream
    end>', while parsing a flow sequence at line 2, column 12" (the parser's own text spans
    several lines and quotes the source). ``added``: characters put before the user's text on
    its first line (``--over`` wraps it in brackets), not counted in the columns there."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())

    def at(mark: Any) -> str:
        column = mark.column - (added if mark.line == 0 else 0)
        return f"line {mark.line + 1}, column {max(column, 0) + 1}"

    mark = exc.problem_mark or exc.context_mark
    text = f"{at(mark)}: " if mark is not None else ""
    text += exc.problem or "malformed"
    if exc.context:
        text += f", {exc.context}"
        if exc.context_mark is not None and exc.context_mark is not mark:
            text += f" at {at(exc.context_mark)}"
    return text


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, but a key given twice in one mapping is an error, and so
    is nesting deeper than Python's recursion allows (a YAMLError, as every malformed text)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except RecursionError:
        raise yaml.YAMLError(
            "nested too deeply: a configuration is a few levels of sections and lists"
        ) from None


CONFIG_BYTES = 16 * 2**20
"""The largest config file read: a config is a few settings, at most a list of prompts or
hand-written positions; the limit keeps an endless input (``-c /dev/zero``) out of memory."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML file as a mapping; a clear error for a missing, unreadable or malformed file."""
    text = read_text(path, "config file", (CONFIG_BYTES, "a config file is settings, not data"))
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise GradlensError(
            f"config file {str(path)!r} is not valid YAML: {yaml_problem(exc)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradlensError(
            f"config file {str(path)!r}: the top level must be a mapping of sections, "
            f"got {type(data).__name__}"
        )
    return data


def build_config(
    path: Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < file < ``--set`` overrides < explicit flags, then validate once."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    for key, value in (flags or {}).items():
        if value is not None:
            apply_override(data, key.split("."), value)
    return validate(data, origin=str(path) if path is not None else "the configuration")


def validate(data: dict[str, Any], origin: str = "the configuration") -> Config:
    """`Config` from a plain mapping, or one `GradlensError` that lists every problem."""
    source = data.get("source")
    if isinstance(source, dict) and "kind" not in source:
        given = source.get("path")
        path = "" if given is None else str(given)  # null: no path, not the path 'None'
        # a batch file's suffix (in any case: dump writes .PT) implies a batch; any other path
        # a model checkpoint directory
        suffix = path.lower().endswith(BATCH_SUFFIXES)
        kind = "batch" if suffix else "model" if path else "synthetic"
        if kind == "synthetic" and "path" in source:  # path: null, no path: the default source
            source = {k: v for k, v in source.items() if k != "path"}
        data = {**data, "source": {"kind": kind, **source}}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = merged_alternatives(exc.errors())
        raise GradlensError(
            f"{origin} has {len(lines)} problem(s):\n  " + "\n  ".join(lines)
        ) from None


def merged_alternatives(errors: list[Any]) -> list[str]:
    """Each pydantic error as `format_error` words it; a setting that takes one of several forms
    (``'auto'`` or a mapping) gets one error per form, tagged in its path (`_union_tag`): one
    line for it, the forms joined by "or"."""
    lines: list[str] = []
    forms: dict[str, int] = {}  # a tagged setting's path → its line
    said: dict[str, set[str]] = {}  # its messages so far: two forms refusing alike, said once
    for err in errors:
        line = format_error(err)
        if not any(_union_tag(p) for p in err["loc"]):
            lines.append(line)
            continue
        where, _, message = line.partition(": ")
        if message in said.setdefault(where, set()):
            continue
        said[where].add(message)
        if where in forms:
            lines[forms[where]] += f"; or {message}"
        else:
            forms[where] = len(lines)
            lines.append(line)
    return lines


def _union_tag(part: Any) -> bool:
    """A part of an error's path that names a union's member (`literal['auto']`,
    `dict[str,int]`), pydantic's, not a key."""
    return isinstance(part, str) and "[" in part


def format_error(err: Any) -> str:
    """One pydantic error as 'dotted.path: what is wrong (got X)'."""
    loc = [str(p) for p in err["loc"] if not _union_tag(p)]
    # A discriminated union puts the chosen tag into the path: source.synthetic.vocab_size.
    source_kind = None
    if len(loc) >= 2 and loc[0] == "source" and loc[1] in SOURCE_KINDS:
        source_kind = loc[1]
        loc = [loc[0], *loc[2:]]
    kind = err["type"]
    where = dotted(loc) or "(top level)"
    if kind == "invalid_key":  # a YAML key that is not text (`1:`, `null:`): not an index
        key = err["input"]
        plain = isinstance(key, (bool, int, float, type(None)))
        shown = json.dumps(key) if plain else str(key)  # as YAML wrote it: null, true, 1, 1.5
        parent = dotted(loc[:-1])
        where = f"{parent}.{shown}" if parent else shown
        what = {type(None): "no value", bool: "a boolean", int: "a number", float: "a number"}
        return (
            f"{where}: a key must be a name, and YAML reads {shown} as "
            f"{what.get(type(key), type(key).__name__)}"
        )
    if isinstance(err.get("input"), NotANumber):
        return f"{where}: {err['input'].message()}"
    if kind == "extra_forbidden":
        allowed = allowed_keys(loc[:-1], source_kind)
        return f"{where}: unknown key; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: {required_message(loc, source_kind)}"
    message = str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    if got is None or isinstance(got, (int, float, str, bool)):
        message += f" (got {got!r})"
    elif got == {}:
        message += " (got an empty mapping {})"
    elif isinstance(got, dict) and kind.endswith(("_type", "_parsing")):
        # keys under a value: `--set loss.eps_low.x=1`, or a YAML mapping where a value goes
        keys = ", ".join(f"{where}.{key}" for key in got)
        noun = "key" if len(got) == 1 else "keys"
        message += f" (got the {noun} {keys}: {where} is a value, not a section)"
    named, colon, rest = message.partition(": ")
    if not loc and named.partition(".")[0] in Config.model_fields:
        return message  # a check across sections, whose message names its own settings
    if loc and colon and named.partition(".")[0] in allowed_keys(loc, source_kind):
        return f"{where}.{named}: {rest}"  # a section's check names its own setting in it
    return f"{where}: {message}"


def dotted(loc: list[str]) -> str:
    """['source', 'sequences', '0', 'positions', '2', 'advantage'] →
    'source.sequences[0].positions[2].advantage'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def section_model(loc: list[str], source_kind: str | None = None) -> type[BaseModel] | None:
    """The model of the config section at ``loc``; None when ``loc`` names no section."""
    model: Any = Config
    for part in loc:
        if part.isdigit():
            continue
        if model is Config and part == "source":
            model = SOURCE_SECTIONS.get(source_kind or "", SyntheticSource)
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def allowed_keys(loc: list[str], source_kind: str | None = None) -> list[str]:
    """The field names of the config section at ``loc`` (for unknown-key messages)."""
    return sorted(getattr(section_model(loc, source_kind), "model_fields", {}))


def required_message(loc: list[str], source_kind: str | None = None) -> str:
    """What a setting that has no default and was not given is (for missing-key messages)."""
    model = section_model(loc[:-1], source_kind)
    field = None if model is None or not loc else model.model_fields.get(loc[-1])
    described = None if field is None else field.description
    return "required, and not given" + (f": {described}" if described else "")


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (what ``gradlens config`` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
