"""The ``model`` section of the report, from the plain records a real checkpoint's source left.

`ModelContext` (gradlens.containers) carries the loaded checkpoint and, for the model source,
the rollout and staleness records; this turns them into report models: the checkpoint
(`ModelInfo`), what was sampled (`RolloutSummary`), the training–inference mismatch and the
ratio trajectory of the stale steps.
"""

from __future__ import annotations

import torch

from gradlens.containers import Batch, LoadedModel, ModelContext, RolloutRecord
from gradlens.diagnostics.mismatch import mismatch_stats
from gradlens.diagnostics.staleness import beyond_ppo, staleness
from gradlens.losses import LossParams
from gradlens.results import (
    ModelInfo,
    ModelReport,
    RolloutSample,
    RolloutSummary,
    Staleness,
)
from gradlens.sources.staleness import MAX_PROBES, SCALE_LIMITS, TARGET_BAND


def model_info(loaded: LoadedModel, train_dtype: str, rollout_dtype: str | None) -> ModelInfo:
    """The checkpoint that was loaded."""
    model = loaded.model
    return ModelInfo(
        path="built-in" if loaded.builtin else str(loaded.path),
        builtin=loaded.builtin,
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        layers=getattr(model.config, "num_hidden_layers", None),
        hidden_size=int(loaded.head.weight.shape[1]),
        vocab_size=loaded.vocab_size,
        tokenizer_size=len(loaded.tokenizer),
        context=loaded.context,
        tied_embeddings=loaded.tied,
        lm_head_bias=loaded.bias,
        train_dtype=train_dtype,
        rollout_dtype=rollout_dtype,
    )


def rollout_summary(record: RolloutRecord, mask: torch.Tensor, train_dtype: str) -> RolloutSummary:
    """What was sampled, and which log-probs are π_old and μ; ``mask`` [N, T] the loss mask."""
    lengths = mask.sum(-1)
    n = len(record.completions)
    rewards = torch.tensor(record.rewards, dtype=torch.float64)
    return RolloutSummary(
        prompts=record.prompt_count,
        group_size=record.group_size,
        sequences=n,
        completion_tokens=int(mask.sum()),
        mean_completion_length=float(lengths.double().mean()),
        stopped_at_eos=record.stopped,
        max_new_tokens=record.max_new_tokens,
        temperature=record.temperature,
        top_p=record.top_p,
        top_k=record.top_k,
        reward=record.reward,
        chat_template=record.chat_template,
        mean_reward=float(rewards.mean()),
        reward_std=float(rewards.std()) if n > 1 else 0.0,
        logp_definition=(
            f"π_θ, π_old (training pass, {train_dtype}) and μ (rollout pass, "
            f"{record.rollout_dtype}) are all softmax(z/T)(y) with T = {record.temperature}; "
            "top-p only restricts sampling and is not renormalised"
        ),
        samples=[
            RolloutSample(
                sequence=i,
                prompt=record.prompts[i],
                completion=record.completions[i],
                tokens=int(lengths[i]),
                reward=record.rewards[i],
            )
            for i in range(n)
        ],
    )


def model_report(ctx: ModelContext, batch: Batch, params: LossParams) -> ModelReport:
    """The section without its per-loss parts (the SFT-over-RL comparison is filled later)."""
    rollout = ctx.rollout
    info = model_info(
        ctx.loaded, ctx.train_dtype, None if rollout is None else rollout.rollout_dtype
    )
    notes = list(ctx.notes)
    if rollout is None:
        return ModelReport(
            source="batch", batch_file=ctx.batch_file, model=info, sft_over_rl=[], notes=notes
        )
    assert batch.rollout_logp is not None  # the model source always has a rollout pass
    stale = None
    if ctx.staleness is not None:
        stale = staleness(
            ctx.staleness,
            batch.old_logp,
            batch.advantages,
            batch.mask,
            params.eps_low,
            params.eps_high,
        )
        notes += staleness_notes(stale)
    return ModelReport(
        model=info,
        rollout=rollout_summary(rollout, batch.mask, ctx.train_dtype),
        mismatch=mismatch_stats(
            batch.old_logp, batch.rollout_logp, batch.mask, rollout.rollout_dtype, ctx.train_dtype
        ),
        staleness=stale,
        sft_over_rl=[],
        notes=notes,
    )


def staleness_notes(section: Staleness) -> list[str]:
    """A target KL the steps did not reach, and a batch far beyond one PPO step."""
    notes = []
    end = section.trajectory[-1] if section.trajectory else None
    target = section.target_kl
    if target is not None and end is not None and section.steps:
        kl = end.kl_k3 or 0.0
        if not target / TARGET_BAND <= kl <= target * TARGET_BAND:
            why = (
                "the steps did not move π: the stale loss's gradient is zero, or its updates "
                f"stayed below the weights' float resolution through {MAX_PROBES} learning "
                f"rates, each {SCALE_LIMITS[1]:g}× the last"
                if kl == 0.0
                else f"after {MAX_PROBES} learning rates per step"
            )
            notes.append(
                f"the stale steps ended at KL k3 {kl:.3g}, not within {TARGET_BAND:g}× of "
                f"source.stale.target_kl = {target:g}: {why}"
            )
    far = beyond_ppo(section)
    if far is not None:
        notes.append(far)
    return notes
