"""A real causal LM as the source: rollouts sampled from it, real staleness, real mismatch.

``source: {kind: model, path: DIR}`` loads a local Hugging Face checkpoint directory with
``transformers.AutoModelForCausalLM.from_pretrained`` (``path: null``: the tiny model that
ships inside gradlens, loaded through exactly the same code). Never a download: a path that is
not a local directory is an error. The batch is built in five steps:

1. Rollout (gradlens.sources.prompts, gradlens.sources.rollout): the prompts are tokenised
   (as plain text, or in the tokenizer's chat template with ``source.chat_template``) and
   completions sampled by a copy of the model in ``source.rollout_dtype`` (the inference
   engine: bf16 where the device computes it natively), at temperature T and top-p. It
   returns μ(y) = softmax(z_rollout/T)(y), the log-prob of each sampled token under the
   rollout pass (top-p truncation not renormalised, see below).
2. Rewards (gradlens.sources.rewards) → advantages by ``advantage.normalization`` over groups
   of ``group_size`` completions of one prompt, broadcast to the completion tokens.
3. π_old: the training pass (the model in ``dtype``, on ``device``) at the rollout parameters
   θ_old: log π_old(y) = log softmax(z/T)(y), z = W h with h the final hidden state (after the
   final norm). This is verl's recomputed ``old_log_probs``; μ is ``rollout_log_probs``.
4. Staleness (gradlens.sources.staleness): N optimizer steps on this batch, θ_old → θ, as far
   as ``source.stale.target_kl`` asks.
5. The batch at θ: ``hidden`` = h/T (so z/T = W·(h/T): the temperature is folded into the
   hidden states and the lm_head gradient keeps its 1/T factor), ``weight`` = W, ``tokens``,
   ``mask`` = the sampled completion tokens (the EOS token included, prompt and padding
   excluded), ``old_logp`` = log π_old, ``rollout_logp`` = log μ, ``advantages``.

With a bias on the lm_head, h is extended by a constant 1 and W by the bias column, so z = W h
still holds and the bias gradient is the last column of ∂L/∂W.

Which log-prob is which, with temperature and top-p: every one of π_θ, π_old and μ is the
softmax of the logits divided by T (verl, TRL and OpenRLHF divide by the sampling temperature
in training too). Top-p only decides which tokens can be sampled; none of the three is
renormalised over the nucleus (DeepSeek-V3.2's "keep sampling mask" would do that).
"""

from __future__ import annotations

import copy

import torch

from gradlens.advantages import advantages_from_rewards
from gradlens.config import DTYPES, ModelSource
from gradlens.containers import Batch, ModelContext, RolloutRecord
from gradlens.losses import get_loss
from gradlens.progress import report
from gradlens.sources.base import SourceContext
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import check_logit_path, head_weight
from gradlens.sources.microbatch import pass_budget
from gradlens.sources.prompts import choose_prompts, has_chat_template, tokenize_prompts
from gradlens.sources.rewards import default_reward, load_reward, score
from gradlens.sources.rollout import rollout_dtype, sample, stop_tokens
from gradlens.sources.staleness import stale_steps


def build_model_batch(src: ModelSource, ctx: SourceContext) -> Batch:
    """The batch described by a `ModelSource` section (see the module docstring)."""
    device, dtype = ctx.device, ctx.dtype
    reward_name = src.reward or default_reward(src.chat_template)
    reward_fn = load_reward(reward_name)
    stale_spec = get_loss(src.stale.loss)
    report("loading checkpoint", 0, 1)
    loaded = load_checkpoint(src.path, device, dtype)
    report("loading checkpoint", 1, 1)
    prompts, prompt_key = choose_prompts(src.prompts, src.num_prompts, ctx.seed, src.chat_template)
    prompt_ids = tokenize_prompts(
        prompts, prompt_key, loaded, src.max_new_tokens, src.chat_template
    )
    if len(prompt_ids[0]) > 1:
        check_logit_path(loaded, prompt_ids[0], device)
    notes = []
    if not src.chat_template and not loaded.builtin and has_chat_template(loaded.tokenizer):
        notes.append(
            "the tokenizer has a chat template, and the prompts were fed as plain text: for an "
            "instruct or chat checkpoint set source.chat_template: true (its template, and the "
            "built-in instructions with the word_limit reward when source.prompts is null)"
        )

    rollout_name, rollout_reason = rollout_dtype(src.rollout_dtype, device)
    roll_dtype = DTYPES[rollout_name]
    roller = loaded.model if roll_dtype == dtype else copy.deepcopy(loaded.model).to(roll_dtype)
    gen = torch.Generator().manual_seed(ctx.seed)
    rollout = sample(
        roller,
        loaded.tokenizer,
        prompt_ids,
        src.group_size,
        src.max_new_tokens,
        src.temperature,
        src.top_p,
        gen,
        device,
        stop_tokens(loaded),
    )
    del roller  # the rollout copy is not needed any more

    group_prompts = [p for p in prompts for _ in range(src.group_size)]
    rewards = score(reward_fn, reward_name, group_prompts, rollout.completions)
    adv, note = advantages_from_rewards(
        torch.tensor(rewards, dtype=torch.float64),
        ctx.normalization,
        src.group_size,
        ctx.advantage_eps,
    )
    seqs = rollout.sequences
    mask = seqs.loss_mask
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    advantages = (adv.to(device)[:, None] * mask).to(acc)  # [N, T], 0 off the completion
    stale = stale_steps(
        loaded.model,
        seqs,
        advantages,
        rollout.rollout_logp,
        src.stale,
        src.temperature,
        stale_spec,
        ctx.params,
        ctx.aggregation,
        loaded.bias,
        pass_budget(ctx.memory_budget_bytes, device),
    )
    hidden, old_logp = stale.hidden, stale.old_logp
    weight = head_weight(loaded.model).detach().clone()
    record = RolloutRecord(
        prompts=group_prompts,
        prompt_count=len(prompts),
        group_size=src.group_size,
        completions=rollout.completions,
        rewards=rewards,
        stopped=rollout.stopped,
        max_new_tokens=src.max_new_tokens,
        temperature=src.temperature,
        top_p=src.top_p,
        reward=reward_name,
        rollout_dtype=rollout_name,
        chat_template=src.chat_template,
    )
    train_dtype = str(dtype).removeprefix("torch.")
    name = "built-in tiny_lm" if loaded.builtin else f"{loaded.path.name}"
    parameters = sum(p.numel() for p in loaded.model.parameters())
    stale_text = (
        f"lr {src.stale.lr:g}"
        if src.stale.target_kl is None
        else f"target KL {src.stale.target_kl:g}"
    )
    return Batch(
        hidden=hidden,
        weight=weight,
        tokens=seqs.tokens,
        mask=mask,
        old_logp=old_logp,
        advantages=advantages.to(old_logp.dtype).to(device),
        rollout_logp=rollout.rollout_logp.to(old_logp.dtype),
        # The reference policy of KL penalties (grpo) is the frozen checkpoint: its training-pass
        # log-probs are π_old's, taken before the stale steps moved π_θ away from it.
        ref_logp=old_logp.clone(),
        source=(
            f"model: {name} ({type(loaded.model).__name__}, {parameters / 1e6:.2f}M parameters"
            f"{', tied embeddings' if loaded.tied else ''}); {len(prompts)} prompts"
            f"{' in its chat template' if src.chat_template else ''} × "
            f"{src.group_size} completions ≤ {src.max_new_tokens} tokens, T = {src.temperature}, "
            f"top-p {src.top_p}; μ in {rollout_name} ({rollout_reason}); {src.stale.steps} stale "
            f"{src.stale.optimizer} step(s) on {src.stale.loss} ({stale_text}); reward "
            f"{reward_name}"
        ),
        advantage_note=note,
        model_context=ModelContext(
            loaded,
            seqs,
            src.temperature,
            train_dtype,
            rollout=record,
            staleness=stale.record,
            notes=notes,
        ),
    )
