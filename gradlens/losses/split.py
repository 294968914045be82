"""The aggregation weights of a batch trained under a split: micro-batch × data parallel × GA.

A trainer rarely differentiates the whole batch at once. With ``micro`` sequences per
micro-batch, ``dp`` data-parallel ranks and ``ga`` gradient-accumulation steps, the B = micro·dp·ga
sequences of one optimizer step are cut into dp·ga micro-batches; each is differentiated alone,
its gradients are summed over the ga steps of a rank, and averaged over the dp ranks (DDP, FSDP
and DeepSpeed all average). Every loss touches the logits of a token through c_t = w_t·g_t
only, so the gradient the trainer ends with is the c-form gradient of the per-token weights

    w_t = dp^p·ga^q / dp · a_t(mode; the normaliser's scope)          (t in micro-batch j)

where a_t is the aggregation weight of `gradlens.losses.aggregation` (the same mode), computed

    scope "micro": on micro-batch j alone (its own N_tok, its own S sequences),
    scope "step":  on the whole step (the global token count, the global batch size),

and dp^p·ga^q is the factor the framework's code multiplies each micro-batch's loss by (verl
0.7–0.9: ×dp to undo the rank average; TRL: ÷ga for its accumulation; …). The full-batch
gradient of the same loss is the same formula at micro = B, dp = ga = 1: one process, one
micro-batch. Comparing the two per token (w_t^split / w_t^full) and through the lm_head says
whether, and where, the gradient depends on the split.

Micro-batch j holds rows [j·micro, (j+1)·micro) of the batch; it runs on rank j mod dp at
accumulation step j div dp. Which rows share a micro-batch matters for the "micro" scope only.

`SplitRule` is one framework setting as data (its mode, scope and factor); the tables, one per
framework and version, are in `gradlens.losses.frameworks.conventions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradlens.errors import GradlensError
from gradlens.losses.aggregation import aggregation_weights

Scope = Literal["micro", "step"]


@dataclass(frozen=True)
class Split:
    """How one optimizer step's batch is cut: ``micro`` sequences per micro-batch, ``dp``
    data-parallel ranks, ``ga`` accumulation steps (B = micro·dp·ga)."""

    micro: int
    dp: int = 1
    ga: int = 1

    @property
    def sequences(self) -> int:
        return self.micro * self.dp * self.ga

    @property
    def text(self) -> str:
        return f"micro={self.micro},dp={self.dp},ga={self.ga}"


@dataclass(frozen=True)
class SplitRule:
    """One framework setting under a split, as data.

    Attributes:
        name: the framework's own name of the setting (verl ``token-mean``, TRL ``bnpo``).
        mode: the `gradlens.losses.aggregation.AGGREGATIONS` key it computes on one micro-batch.
        count_empty_sequences: S counts every row (B), not only the non-empty ones (B').
        scope: where the normaliser (N_tok, S) is counted: "micro" or "step" (module docstring).
        dp_power, ga_power: each micro-batch's loss is multiplied by dp^dp_power·ga^ga_power.
        how: what the framework's code does, in words.
        source: where it was read (file, function, version).
        aliases: other names of the framework for the same setting (TRL ``sapo`` = ``grpo``).
    """

    name: str
    mode: str
    count_empty_sequences: bool
    scope: Scope
    dp_power: int
    ga_power: int
    how: str
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def scale(self, split: Split) -> float:
        """The factor on each micro-batch's loss times the 1/dp of the rank average."""
        return float(split.dp) ** self.dp_power * float(split.ga) ** self.ga_power / split.dp


@dataclass(frozen=True)
class Convention:
    """One framework at some versions: its settings under a split.

    Attributes:
        name: the ``--convention`` value (``verl``, ``trl``, ...).
        framework: the framework, in words.
        versions: the versions the table holds for.
        rules: the framework's settings, each a `SplitRule`.
    """

    name: str
    framework: str
    versions: str
    rules: tuple[SplitRule, ...]

    def rule(self, name: str) -> SplitRule:
        for r in self.rules:
            if name in r.names:
                return r
        valid = ", ".join(f"{self.name}:{n}" for r in self.rules for n in r.names)
        raise GradlensError(
            f"split.convention {self.name}:{name}: {self.framework} ({self.versions}) has no "
            f"setting {name!r}; it has {valid}"
        )

    def for_mode(self, mode: str) -> SplitRule:
        """The one setting that computes aggregation ``mode`` (loss.aggregation)."""
        found = [r for r in self.rules if r.mode == mode]
        if len(found) == 1:
            return found[0]
        choices = ", ".join(f"{self.name}:{r.name}" for r in (found or self.rules))
        why = "several settings compute it" if found else "none of its settings computes it"
        raise GradlensError(
            f"split.convention {self.name}: loss.aggregation is {mode!r} and {why}; name the "
            f"setting: {choices}"
        )


@dataclass(frozen=True)
class MicroBatch:
    """Micro-batch ``index``: rows [start, stop), on ``rank`` at accumulation ``step``."""

    index: int
    rank: int
    step: int
    start: int
    stop: int


def micro_batches(split: Split, num_sequences: int) -> list[MicroBatch]:
    """The dp·ga micro-batches of a batch of ``num_sequences`` rows; an error naming the split's
    fields when micro·dp·ga ≠ B."""
    if split.sequences != num_sequences:
        raise GradlensError(
            f"split: micro·dp·ga = {split.micro}·{split.dp}·{split.ga} = {split.sequences} "
            f"sequences, but the batch has {num_sequences}; one optimizer step's batch is cut "
            "into dp·ga micro-batches of `micro` sequences, so choose split.micro, split.dp and "
            f"split.ga whose product is {num_sequences}"
        )
    return [
        MicroBatch(j, j % split.dp, j // split.dp, j * split.micro, (j + 1) * split.micro)
        for j in range(split.dp * split.ga)
    ]


def split_weights(
    mask: Tensor,
    rule: SplitRule,
    split: Split,
    loss_scale_factor: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """[N, T] w_t of ``mask`` [N, T] trained under ``split`` as ``rule`` says (module
    docstring); 0 at masked positions."""
    parts = micro_batches(split, int(mask.shape[0]))
    scale = rule.scale(split)
    if rule.scope == "step":
        a = aggregation_weights(
            mask, rule.mode, loss_scale_factor, dtype, rule.count_empty_sequences
        )
        return a * scale
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    for part in parts:
        rows = slice(part.start, part.stop)
        out[rows] = scale * aggregation_weights(
            mask[rows], rule.mode, loss_scale_factor, dtype, rule.count_empty_sequences
        )
    return out


def full_weights(
    mask: Tensor,
    rule: SplitRule,
    loss_scale_factor: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """[N, T] the same rule on the whole batch at once: one micro-batch, dp = ga = 1."""
    return split_weights(mask, rule, Split(int(mask.shape[0])), loss_scale_factor, dtype)
