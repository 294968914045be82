"""Token aggregation: how per-token losses become one scalar (verl ``agg_loss`` meanings).

The aggregated loss is L = Σ_{i,t} a_{i,t}·ℓ_{i,t}·m_{i,t}, so a loss's coefficient on the
logits of token (i, t) is c_{i,t} = a_{i,t}·g_{i,t}. With m the mask, |y_i| = Σ_t m_{i,t},
N_tok = Σ m and B' the number of sequences with at least one valid token:

    token_mean               a = 1/N_tok           verl default; TRL dapo/bnpo/cispo
    seq_mean_token_mean      a = 1/(B'·|y_i|)      GRPO paper; TRL grpo, sapo
    seq_mean_token_sum       a = 1/B'              MiniRL eq. 7
    seq_mean_token_sum_norm  a = 1/L_scale         Dr. GRPO; L_scale = loss_scale_factor or T
                                                    (the padded length); no 1/B (trap A6)

The choice is independent of the surrogate: every loss is aggregated the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.errors import GradlensError, unknown_name_message

WeightFn = Callable[[Tensor, float | None], Tensor]


def _lengths(mask: Tensor) -> Tensor:
    return mask.sum(-1, keepdim=True)  # [N, 1]


def _num_sequences(mask: Tensor) -> Tensor:
    return (mask.sum(-1) > 0).sum().clamp(min=1)


def token_mean(mask: Tensor, scale: float | None) -> Tensor:
    return mask / mask.sum().clamp(min=1)


def seq_mean_token_mean(mask: Tensor, scale: float | None) -> Tensor:
    return mask / (_lengths(mask).clamp(min=1) * _num_sequences(mask))


def seq_mean_token_sum(mask: Tensor, scale: float | None) -> Tensor:
    return mask / _num_sequences(mask)


def seq_mean_token_sum_norm(mask: Tensor, scale: float | None) -> Tensor:
    return mask / (scale if scale is not None else mask.shape[-1])


AGGREGATIONS: dict[str, WeightFn] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


@dataclass(frozen=True)
class Aggregation:
    """The run's token aggregation: the mode and, for ``seq_mean_token_sum_norm``, L_scale.

    It travels beside the loss settings, never inside them: the surrogate and the aggregation
    are independent choices (design.md, example 4). Only losses that aggregate themselves
    (user and framework functions) receive it.
    """

    mode: str = "token_mean"
    loss_scale_factor: float | None = None

    def weights(self, mask: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """[N, T] a_{i,t} for ``mask`` [N, T]."""
        return aggregation_weights(mask, self.mode, self.loss_scale_factor, dtype)


def aggregation_weights(
    mask: Tensor,
    mode: str,
    loss_scale_factor: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """[N, T] per-token weights a_{i,t} of aggregation ``mode`` (0 at masked positions)."""
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise GradlensError(unknown_name_message("aggregation", mode, list(AGGREGATIONS))) from None
    return fn(mask.to(dtype), loss_scale_factor)
