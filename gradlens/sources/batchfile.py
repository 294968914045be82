"""A rollout batch dumped from a real training run (see `gradlens.batchfile` for the format).

The file gives the sampled tokens, the mask, π_old (and optionally μ_old and π_ref) and the
advantages, or rewards that ``advantage.normalization`` turns into advantages with
``source.group_size`` consecutive sequences per prompt. The lm_head analysis needs the final
hidden states and the lm_head weight: stored in the file as ``hidden_states`` and
``lm_head_weight``, or recomputed from the file's prompt and response token ids by the
checkpoint at ``source.model_path`` (gradlens.sources.recompute), which then wins over any
stored ones; with it, every loss also runs through the whole checkpoint unless
``source.whole_model`` is false (the batch then carries a `ModelContext`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradlens.advantages import advantages_from_rewards
from gradlens.batchfile import read_batch_tensors
from gradlens.containers import Batch
from gradlens.errors import GradlensError
from gradlens.logits import softmax_dtype


def build_batchfile(src: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Batch:
    """The batch stored at ``source.path``."""
    path = Path(src.path).expanduser()
    data = read_batch_tensors(path, prompts=src.model_path is not None)
    origin = ""
    context = None
    if src.model_path is not None:
        from gradlens.sources.recompute import recompute_hidden

        recomputed = recompute_hidden(
            src.model_path,
            data,
            src.temperature,
            device,
            dtype,
            whole_model_of=str(path) if src.runs_whole_model else None,
        )
        hidden, weight, context = recomputed.hidden, recomputed.weight, recomputed.context
        origin = f"; {recomputed.description}"
        if "hidden" in data:
            origin += " (the file's hidden_states and lm_head_weight are not used)"
    elif "hidden" in data:
        hidden, weight = data["hidden"], data["weight"]
    else:
        raise GradlensError(
            f"source.path: {path.name} has no 'hidden_states' and 'lm_head_weight'; write them "
            "into the file, or set source.model_path to a checkpoint that recomputes them from "
            "the file's token ids (docs/batchfile.md shows both)"
        )
    mask = data["mask"]
    n, t = mask.shape
    acc = softmax_dtype(dtype)
    if "advantages" in data:
        adv = data["advantages"]
        note = "read from the file"
    else:
        rewards = data["rewards"]
        rewards = (rewards * mask).sum(-1) if rewards.dim() == 2 else rewards  # [N]
        if n % src.group_size:
            raise GradlensError(
                f"source.group_size: {n} sequences are not a multiple of {src.group_size}"
            )
        adv, note = advantages_from_rewards(
            rewards, config.advantage.normalization, src.group_size, config.advantage.eps
        )
        note = f"from the file's rewards: {note}"
    advantages = (adv[:, None] if adv.dim() == 1 else adv).expand(n, t) * mask

    groups = None  # prompt groups only when stated: the default group_size 1 is no statement
    if "group_size" in src.model_fields_set:
        if n % src.group_size:
            raise GradlensError(
                f"source.group_size: {n} sequences are not a multiple of {src.group_size}"
            )
        groups = (torch.arange(n) // src.group_size).to(device)

    def opt(name: str) -> torch.Tensor | None:
        return data[name].to(acc).to(device) if name in data else None

    return Batch(
        hidden=hidden.to(dtype).to(device),
        weight=weight.to(dtype).to(device),
        tokens=data["tokens"].to(device),
        mask=mask.to(device),
        old_logp=data["old_logp"].to(acc).to(device),
        advantages=advantages.to(acc).to(device),
        rollout_logp=opt("rollout_logp"),
        ref_logp=opt("ref_logp"),
        groups=groups,
        source=(
            f"batch file {path.name}: {n} sequences × ≤{t} tokens, "
            f"V={weight.shape[0]}, H={weight.shape[1]}{origin}"
        ),
        advantage_note=note,
        model_context=context,
    )
