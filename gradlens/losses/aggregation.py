"""Token aggregation: how per-token losses become one scalar, each mode named for what it computes.

The aggregated loss is L = Σ_{i,t} a_{i,t}·ℓ_{i,t}·m_{i,t}, so a loss's coefficient on the
logits of token (i, t) is c_{i,t} = a_{i,t}·g_{i,t}. With m the mask, |y_i| = Σ_t m_{i,t},
N_tok = Σ m, L the length scale (``loss_scale_factor``, or else T, the padded length) and S
the number of sequences a "seq_mean" divides by:

    token_mean               a = 1/N_tok
    token_sum                a = 1
    seq_mean_token_mean      a = 1/(S·|y_i|)
    seq_mean_token_sum       a = 1/S
    token_sum_norm           a = 1/L               no division by the number of sequences
    seq_mean_token_sum_norm  a = 1/(S·L)
    prompt_average           a = 1/(G·N_tok,g)     ScaleRL: each prompt group's tokens averaged,
                                                   then the G prompt groups averaged

``prompt_average`` (ScaleRL, Khatri et al., arXiv 2510.13786, §3 "loss aggregation"): with the
prompt groups g of the batch (the G responses sampled for one prompt; `Batch.groups`), N_tok,g
the valid tokens of group g and G the groups with at least one valid token,

    L = (1/G)·Σ_g (1/N_tok,g)·Σ_{i∈g} Σ_t ℓ_{i,t}

Within a group it is ``token_mean``; across groups every prompt weighs the same, whatever the
length of its responses. With one group it is ``token_mean``; with groups of one sequence it is
``seq_mean_token_mean`` (S = B'). It needs the prompt groups (the synthetic and model sources
know them; literal sequences state ``group``; a batch file needs ``source.group_size``).

S is B', the sequences with at least one valid token, or with ``count_empty_sequences`` B,
every row of the batch: TRL's ``grpo``/``sapo``/``dr_grpo`` and verl's trainer divide by B (its
``global_batch_size`` counts every row), verl called standalone and OpenRLHF by B'. The two
choices are independent of each other and of the surrogate: every loss is aggregated the same
way. `AGGREGATIONS` says which framework, at which version, computes each mode
(docs/losses.md §3 has the table with the sources).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.errors import GradlensError, unknown_name_message

# (mask [N, T] as floats, S the number of sequences, L the length scale, the [N] prompt-group
# ids or None) → [N, T] weights
WeightFn = Callable[[Tensor, Tensor, float, Tensor | None], Tensor]


@dataclass(frozen=True)
class Mode:
    """One aggregation mode: its weights and what it is.

    Attributes:
        weights: the weight function.
        formula: what L is, in plain maths (Σ is the masked sum of the per-token losses).
        used_by: which frameworks compute it, with the versions they were read from.
    """

    weights: WeightFn
    formula: str
    used_by: str


def _lengths(mask: Tensor) -> Tensor:
    return mask.sum(-1, keepdim=True)  # [N, 1]


AGGREGATIONS: dict[str, Mode] = {
    "token_mean": Mode(
        lambda m, s, scale, groups: m / m.sum().clamp(min=1),
        "Σ/N_tok",
        "verl token-mean (all versions); TRL 1.16 bnpo, and dapo/cispo when num_items_in_batch "
        "is the micro-batch's tokens; OpenRLHF 0.11 token-mean; DAPO",
    ),
    "token_sum": Mode(
        lambda m, s, scale, groups: m,
        "Σ",
        "verl 0.9 token-sum (absent in 0.7 and 0.8)",
    ),
    "seq_mean_token_mean": Mode(
        lambda m, s, scale, groups: m / (_lengths(m).clamp(min=1) * s),
        "Σ_i (Σ_t/|y_i|) / S",
        "verl seq-mean-token-mean (|y_i| + 1e-8); TRL 1.16 grpo, sapo (S = B); OpenRLHF 0.11 "
        "seq-mean-token-mean (|y_i| + 1e-8, S = B'); GRPO paper",
    ),
    "seq_mean_token_sum": Mode(
        lambda m, s, scale, groups: m / s,
        "Σ/S",
        "verl seq-mean-token-sum; TRL 1.16 luspo (S = B); MiniRL",
    ),
    "token_sum_norm": Mode(
        lambda m, s, scale, groups: m / scale,
        "Σ/L",
        "verl ≤ 0.6 seq-mean-token-sum-norm (no division by the number of sequences)",
    ),
    "seq_mean_token_sum_norm": Mode(
        lambda m, s, scale, groups: m / (s * scale),
        "Σ/(S·L)",
        "verl 0.7–0.9 seq-mean-token-sum-norm (S = B' standalone, B in the trainer); TRL 1.16 "
        "dr_grpo with L = max_completion_length (S = B)",
    ),
}


def _prompt_average(m: Tensor, s: Tensor, scale: float, groups: Tensor | None) -> Tensor:
    """a = 1/(G·N_tok,g) (module docstring); ``groups`` [N] prompt-group ids."""
    if groups is None:
        raise GradlensError(
            "loss.aggregation = prompt_average averages each prompt group's tokens, and this "
            "batch has no prompt groups: set source.group_size (synthetic, model or batch-file "
            "source), group on each literal sequence, or pass groups= to gradlens.diagnose"
        )
    _, index = torch.unique(groups.to(m.device), return_inverse=True)  # [N] 0..K−1
    per_group = torch.zeros(int(index.max()) + 1, dtype=m.dtype, device=m.device)
    per_group = per_group.index_add(0, index, m.sum(-1))  # [K] N_tok,g
    present = (per_group > 0).sum().clamp(min=1)  # G: the groups with a valid token
    return m / (per_group.clamp(min=1.0)[index][:, None] * present)


AGGREGATIONS["prompt_average"] = Mode(
    _prompt_average,
    "Σ_g (Σ_{i∈g} Σ_t / N_tok,g) / G",
    "ScaleRL (arXiv 2510.13786) prompt-average; no framework default",
)


def num_sequences(mask: Tensor, count_empty_sequences: bool = False) -> Tensor:
    """S: every row of ``mask`` [N, T], or only those with a valid token (at least 1)."""
    if count_empty_sequences:
        return torch.tensor(float(max(mask.shape[0], 1)), dtype=torch.float64)
    return (mask.sum(-1) > 0).sum().clamp(min=1)


@dataclass(frozen=True)
class Aggregation:
    """The run's token aggregation: the mode, L for the ``*_norm`` modes, and what S counts.

    It travels beside the loss settings, never inside them: the surrogate and the aggregation
    are independent choices (design.md, example 4). Only losses that aggregate themselves
    (user and framework functions) receive it.

    Attributes:
        mode: a key of `AGGREGATIONS`.
        loss_scale_factor: L of ``token_sum_norm`` and ``seq_mean_token_sum_norm``; None: the
            padded length T of the batch.
        count_empty_sequences: S is every row B (TRL, verl's trainer), not B'.
    """

    mode: str = "token_mean"
    loss_scale_factor: float | None = None
    count_empty_sequences: bool = False

    def weights(
        self, mask: Tensor, dtype: torch.dtype = torch.float64, groups: Tensor | None = None
    ) -> Tensor:
        """[N, T] a_{i,t} for ``mask`` [N, T] (``groups`` [N]: the prompt groups, which
        ``prompt_average`` needs)."""
        return aggregation_weights(
            mask, self.mode, self.loss_scale_factor, dtype, self.count_empty_sequences, groups
        )


def aggregation_weights(
    mask: Tensor,
    mode: str,
    loss_scale_factor: float | None = None,
    dtype: torch.dtype = torch.float64,
    count_empty_sequences: bool = False,
    groups: Tensor | None = None,
) -> Tensor:
    """[N, T] per-token weights a_{i,t} of aggregation ``mode`` (0 at masked positions);
    ``groups`` [N] the prompt-group ids (``prompt_average`` needs them)."""
    try:
        fn = AGGREGATIONS[mode].weights
    except KeyError:
        raise GradlensError(unknown_name_message("aggregation", mode, list(AGGREGATIONS))) from None
    m = mask.to(dtype)
    scale = float(loss_scale_factor) if loss_scale_factor is not None else float(mask.shape[-1])
    s = num_sequences(mask, count_empty_sequences).to(dtype=dtype, device=mask.device)
    return fn(m, s, scale, groups)
