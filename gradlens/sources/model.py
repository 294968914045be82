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
   excluded), ``old_logp`` = log π_old, ``rollout_logp`` = log μ, ``advantages``; with
   ``source.teacher_path``, a second checkpoint's pass over the same sequences as the
   distillation teacher (gradlens.sources.teacher_model).

Two switches choose how the two passes compute what they compare (gradlens.sources.passes):
``source.rollout_logprobs`` (μ from the sampler's key-value cache, or from one full forward of
the rollout model) and ``source.train_pass`` (π_old scored in padded micro-batches, or sequence
by sequence without padding); with ``rollout_dtype`` they are the source's known causes of
training–inference mismatch, each measured by switching it (docs/mismatch.md).

With a bias on the lm_head, h is extended by a constant 1 and W by the bias column, so z = W h
still holds and the bias gradient is the last column of ∂L/∂W.

Which log-prob is which, with temperature, top-p and top-k: every one of π_θ, π_old and μ is
the softmax of the logits divided by T (verl, TRL and OpenRLHF divide by the sampling
temperature in training too). Top-p and top-k only decide which tokens can be sampled; none of
the three is renormalised over the kept set K_t. The batch records K_t (`KeptSets`) with the
kept masses log S^μ_t (rollout pass) and log S^old_t (π_old's training pass; π_ref is π_old
here), so that ``loss.sampling_support: kept`` can replay it (DeepSeek-V3.2's "keep sampling
mask", `gradlens.grads.replay`). The stale steps use the whole vocabulary either way.
"""

from __future__ import annotations

import torch

from gradlens.advantages import advantages_from_rewards
from gradlens.config import DTYPE_NAMES_OF, DTYPES, ModelSource
from gradlens.containers import Batch, KeptSets, ModelContext, Origin, RolloutRecord
from gradlens.errors import GradlensError
from gradlens.losses import get_loss
from gradlens.memory import Estimate, Shape, dtype_bytes, release_free_memory
from gradlens.progress import report
from gradlens.sources.base import SourceContext, SourcePlan
from gradlens.sources.checkpoint import (
    checkpoint_estimate,
    checkpoint_sizes,
    has_chat_template,
    load_checkpoint,
)
from gradlens.sources.forward import check_logit_path, head_weight
from gradlens.sources.microbatch import pass_budget
from gradlens.sources.passes import full_sequence_logp, score_alone
from gradlens.sources.prompts import choose_prompts, tokenize_prompts
from gradlens.sources.rewards import default_reward, load_reward, score
from gradlens.sources.rollout import rollout_copy, rollout_dtype, sample, stop_tokens
from gradlens.sources.shared_prefix import padded_note, with_shared_prefix
from gradlens.sources.staleness import stale_steps
from gradlens.sources.teacher_model import check_teacher_context, model_teacher
from gradlens.sources.training_pass_check import check_training_pass, reference_pass


def offloaded(model: torch.nn.Module) -> bool:
    """Whether accelerate offloaded some of ``model``'s parameters (they wait on the meta device
    between passes)."""
    return any(p.device.type == "meta" for p in model.parameters())


def build_model_batch(src: ModelSource, ctx: SourceContext) -> Batch:
    """The batch described by a `ModelSource` section (see the module docstring)."""
    device, dtype = ctx.device, ctx.dtype
    reward_name = src.reward or default_reward(src.chat_template)
    reward_fn = load_reward(reward_name)
    stale_spec = get_loss(src.stale.loss)
    report("loading checkpoint", 0, 1)
    loaded = load_checkpoint(
        src.path,
        device,
        dtype,
        device_map=src.device_map,
        chat_template=src.chat_template,
    )
    report("loading checkpoint", 1, 1)
    prompts, prompt_key = choose_prompts(src.prompts, src.num_prompts, ctx.seed, src.chat_template)
    prompt_ids = tokenize_prompts(
        prompts, prompt_key, loaded, src.max_new_tokens, src.chat_template
    )
    if len(prompt_ids[0]) > 1:
        check_logit_path(loaded, prompt_ids[0], device)
    if src.teacher_path is not None:  # before the rollout: the teacher must read each whole
        teacher_sizes = checkpoint_sizes(teacher_dir(src.teacher_path))
        if teacher_sizes is not None:
            row = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
            check_teacher_context(
                teacher_sizes.context,
                src.teacher_path,
                len(prompt_ids[row]) + src.max_new_tokens,
                f"prompt {row} ({len(prompt_ids[row])} tokens) with source.max_new_tokens = "
                f"{src.max_new_tokens}",
            )
    notes = []
    if not src.chat_template and not loaded.builtin and has_chat_template(loaded.tokenizer):
        notes.append(
            "the tokenizer has a chat template, and the prompts were fed as plain text: for an "
            "instruct or chat checkpoint set source.chat_template: true (its template, and the "
            "built-in instructions with the word_limit reward when source.prompts is null)"
        )

    rollout_name, rollout_reason = rollout_dtype(src.rollout_dtype, device)
    roll_dtype = DTYPES[rollout_name]
    on_disk = offloaded(loaded.model)
    if on_disk:  # their parameters are on the meta device: backward leaves them no gradient
        notes.append(
            "whole-model gradients not computed: source.device_map offloads modules to disk, "
            "whose parameters get no gradient through accelerate's hooks (the lm_head "
            "diagnostics are unaffected)"
        )
    if roll_dtype != dtype and on_disk:
        raise GradlensError(
            f"source.device_map: {src.device_map!r} offloads modules to disk, and a model with "
            f"offloaded modules cannot be copied to the rollout's {rollout_name}; set "
            f"source.rollout_dtype to the run's dtype ({DTYPE_NAMES_OF[dtype]}), or place every "
            "module on cpu or a device"
        )
    roller = loaded.model if roll_dtype == dtype else rollout_copy(loaded.model, roll_dtype)
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
        stop=stop_tokens(loaded),
        top_k=src.top_k,
    )
    rollout_logp = rollout.rollout_logp
    if src.rollout_logprobs == "full":  # μ by one forward per sequence, not the cache's
        rollout_logp = full_sequence_logp(roller, rollout.sequences, src.temperature)
    check_training_pass(  # the sampler's μ: the rollout copy's own probabilities, to rounding
        reference_pass(roller, rollout.sequences, src.temperature),
        rollout_logp[0],
        "the rollout's log-probs (log μ)",
    )
    del roller  # the rollout copy is not needed any more
    release_free_memory()  # its pages, and the sampler's, before the stale steps' state

    group_prompts = [p for p in prompts for _ in range(src.group_size)]
    rewards = score(reward_fn, reward_name, group_prompts, rollout.completions)
    adv, note = advantages_from_rewards(
        torch.tensor(rewards, dtype=torch.float64),
        ctx.normalization,
        src.group_size,
        ctx.advantage_eps,
    )
    seqs = rollout.sequences
    if src.shared_prefix:
        seqs, problem = with_shared_prefix(loaded.model, seqs)
        if problem is not None:
            notes.append(padded_note(problem))
    mask = seqs.loss_mask
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    advantages = (adv.to(device)[:, None] * mask).to(acc)  # [N, T], 0 off the completion
    groups = torch.arange(mask.shape[0], device=device) // src.group_size  # consecutive completions
    # the model's own log-probs of the first sequence at θ_old, to check the training pass by
    reference = reference_pass(loaded.model, seqs, src.temperature)
    alone = None
    if src.train_pass == "alone":  # π_old with each sequence scored by itself, at θ_old
        alone = score_alone(loaded.model, seqs, src.temperature, loaded.bias)
    stale = stale_steps(
        loaded.model,
        seqs,
        advantages,
        rollout_logp,
        src.stale,
        src.temperature,
        stale_spec,
        ctx.params,
        ctx.aggregation,
        loaded.bias,
        pass_budget(ctx.memory_budget_bytes, device),
        rollout.kept_ids,
        groups,
    )
    release_free_memory()  # the optimizer state and the steps' graphs are gone
    hidden, old_logp = stale.hidden, stale.old_logp
    if alone is not None:
        old_logp = alone.to(old_logp.dtype)
    check_training_pass(reference, old_logp[0])
    weight = head_weight(loaded.model).detach().clone()
    teacher = None
    if src.teacher_path is not None:
        teacher, teacher_problem = model_teacher(
            teacher_dir(src.teacher_path),
            loaded,
            rollout.sequences,  # packed after the teacher's own check
            seqs.tokens,
            src.temperature,
            device,
            dtype,
            pass_budget(ctx.memory_budget_bytes, device),
            shared_prefix=src.shared_prefix,
        )
        if teacher_problem is not None:
            notes.append(padded_note(teacher_problem, "the teacher's forward"))
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
        top_k=src.top_k,
        chat_template=src.chat_template,
    )
    kept = None
    if rollout.kept_ids is not None:
        rule = " and ".join(
            ([f"top-k {src.top_k}"] if src.top_k > 0 else [])
            + ([f"top-p {src.top_p}"] if src.top_p < 1.0 else [])
        )
        kept = KeptSets(
            ids=rollout.kept_ids,
            rule=rule,
            old_log_mass=stale.old_kept_log_mass,
            rollout_log_mass=None
            if rollout.kept_log_mass is None
            else rollout.kept_log_mass.to(old_logp.dtype),
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
        rollout_logp=rollout_logp.to(old_logp.dtype),
        # The reference policy of KL penalties (grpo) is the frozen checkpoint: its training-pass
        # log-probs are π_old's, taken before the stale steps moved π_θ away from it.
        ref_logp=old_logp.clone(),
        groups=groups,
        source=(
            f"model: {name} ({type(loaded.model).__name__}, {parameters / 1e6:.2f}M parameters"
            f"{', tied embeddings' if loaded.tied else ''}); {len(prompts)} prompts"
            f"{' in its chat template' if src.chat_template else ''} × "
            f"{src.group_size} completions ≤ {src.max_new_tokens} tokens, T = {src.temperature}, "
            f"top-p {src.top_p}{f', top-k {src.top_k}' if src.top_k else ''}; "
            f"μ in {rollout_name} ({rollout_reason}"
            f"{', full-sequence forward' if src.rollout_logprobs == 'full' else ''})"
            f"{'; π_old scored sequence by sequence' if alone is not None else ''}; "
            f"{src.stale.steps} stale "
            f"{src.stale.optimizer} step(s) on {src.stale.loss} ({stale_text}); reward "
            f"{reward_name}" + ("" if src.teacher_path is None else f"; teacher {src.teacher_path}")
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
            whole_model=not on_disk,
            tape=None if on_disk else stale.tape,  # kept only for the gradients to replay
            sequence_bytes=stale.sequence_bytes,
        ),
        kept=kept,
        teacher=teacher,
        origin=Origin(model_names, COMPUTED),
    )


def plan_model(src: ModelSource, ctx: SourceContext) -> SourcePlan:
    """The batch's sizes and the peak of sampling and training passes, from the checkpoint's
    config.json and weight files: its parameters in the training dtype (again in the rollout
    dtype when it differs; with a gradient and the optimizer's state for the stale steps) and the
    logits of the passes over N = prompts × group_size sequences of at least max_new_tokens
    completion tokens (the prompts' lengths are known only once tokenised)."""
    sizes = checkpoint_sizes(src.path)
    n = (len(src.prompts) if src.prompts is not None else src.num_prompts) * src.group_size
    provides = frozenset({"rollout_logp", "ref_logp"})
    teacher_terms: tuple[tuple[str, int], ...] = ()
    if src.teacher_path is not None:
        provides |= {"teacher", "teacher_full", "teacher_logp"}
        teacher = checkpoint_sizes(teacher_dir(src.teacher_path))
        if teacher is not None:  # its parameters, and its hidden states and logits [N, T, ·]
            grid = n * src.max_new_tokens
            teacher_terms = (
                ("the teacher's parameters", teacher.parameters * dtype_bytes(ctx.dtype)),
                (
                    "the teacher's hidden states and logits",
                    grid * (teacher.hidden + teacher.vocab) * dtype_bytes(ctx.dtype),
                ),
            )
    if sizes is None:
        return SourcePlan((), None, provides)
    params = sizes.parameters
    extra = []
    rollout_name, _ = rollout_dtype(src.rollout_dtype, ctx.device)
    if rollout_name != str(ctx.dtype).removeprefix("torch."):
        extra.append(("rollout copy of the parameters", params * dtype_bytes(DTYPES[rollout_name])))
    if src.stale.steps:
        # kept between steps (gradlens.sources.optimizers): SGD its last gradient, Adam g_1 or
        # the last direction up to two steps, m and v from the third on
        moments = 2 if src.stale.optimizer != "sgd" and src.stale.steps > 2 else 1
        extra.append(
            ("gradients and optimizer state", params * dtype_bytes(ctx.dtype) * (1 + moments))
        )
    settings = "source.path, source.num_prompts × source.group_size × source.max_new_tokens"
    extra += teacher_terms
    estimate = checkpoint_estimate(sizes, settings, ctx.dtype, n, src.max_new_tokens, tuple(extra))
    return SourcePlan(
        memory=(Estimate("the model source", settings, estimate.terms),),
        shape=Shape(n, src.max_new_tokens, sizes.vocab, sizes.hidden, tokens=n),  # ≥ 1 each
        provides=provides,
    )


# What the model computed (everything but the rewards' advantages): a problem there is a
# finding of the report, not an input error.
COMPUTED = frozenset(
    {"tokens", "mask", "old_logp", "rollout_logp", "ref_logp", "hidden", "weight", "on_policy"}
    | {"teacher_hidden", "teacher_weight", "teacher_logp"}
)
MODEL_WORDS = {
    "tokens": "the sampled tokens",
    "mask": "the completion mask",
    "advantages": "the advantages from source.reward",
    "old_logp": "log π_old from the training pass",
    "rollout_logp": "log μ_old from the rollout pass",
    "ref_logp": "log π_ref from the training pass",
    "hidden": "the model's final hidden states",
    "weight": "the model's lm_head weight",
    "teacher_hidden": "the teacher's final hidden states (source.teacher_path)",
    "teacher_weight": "the teacher's lm_head weight (source.teacher_path)",
    "teacher_logp": "log q(y) from the teacher's pass (source.teacher_path)",
}


def teacher_dir(path: str) -> str | None:
    """``source.teacher_path`` as `load_checkpoint` takes it: None for the built-in model."""
    return None if path == "builtin" else path


def model_names(field: str, index: tuple[int, ...]) -> str:
    """Each tensor by what the model computed (`Origin.name`)."""
    at = f"[{', '.join(map(str, index))}]" if index else ""
    return f"{MODEL_WORDS.get(field, field)}{at}"
