"""From per-sequence rewards R to advantages Â (a registry of normalisations).

Sequences come in groups of G consecutive rollouts of one prompt. With mean and std taken over
the group (or over the batch), and std the unbiased (N − 1) estimate as in verl and TRL:

    none        Â = R                                raw reward
    group       Â = (R − mean_g) / (std_g + eps)     GRPO (DeepSeekMath eq. 3), TRL default
    group_mean  Â = R − mean_g                       Dr. GRPO, MiniRL, DeepSeek-V3.2 (trap A2)
    batch       Â = (R − mean_B) / (std_B + eps)     batch normalisation; E|Â| ≈ √(2/π) for
                                                     Gaussian rewards, as the seed post uses

A group whose rewards are all equal gets Â = 0 under ``group`` and ``group_mean``: no signal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Normalizer = Callable[[Tensor, int, float], Tensor]


def _std(x: Tensor, dim: int) -> Tensor:
    """Unbiased std; 0 (not NaN) for a single element."""
    if x.shape[dim] < 2:
        return torch.zeros_like(x.mean(dim, keepdim=True))
    return x.std(dim, keepdim=True, unbiased=True)


def none(rewards: Tensor, group_size: int, eps: float) -> Tensor:
    return rewards.clone()


def group(rewards: Tensor, group_size: int, eps: float) -> Tensor:
    g = rewards.view(-1, group_size)  # [N/G, G]
    return ((g - g.mean(-1, keepdim=True)) / (_std(g, -1) + eps)).reshape(-1)


def group_mean(rewards: Tensor, group_size: int, eps: float) -> Tensor:
    g = rewards.view(-1, group_size)  # [N/G, G]
    return (g - g.mean(-1, keepdim=True)).reshape(-1)


def batch(rewards: Tensor, group_size: int, eps: float) -> Tensor:
    r = rewards.view(1, -1)
    return ((r - r.mean(-1, keepdim=True)) / (_std(r, -1) + eps)).reshape(-1)


NORMALIZERS: dict[str, tuple[Normalizer, str]] = {
    "none": (none, "raw reward R"),
    "group": (group, "group-normalised (R − mean_group)/(std_group + eps)"),
    "group_mean": (group_mean, "group mean-centred R − mean_group (no std)"),
    "batch": (batch, "batch-normalised (R − mean_batch)/(std_batch + eps)"),
}


def advantages_from_rewards(
    rewards: Tensor, normalization: str, group_size: int, eps: float
) -> tuple[Tensor, str]:
    """[N] rewards → ([N] advantages, a description of how they were computed)."""
    fn, description = NORMALIZERS[normalization]
    return fn(rewards, group_size, eps), f"{description}, group size {group_size}"
