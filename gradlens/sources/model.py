"""A real causal LM as the source: rollouts sampled from it, real staleness, real mismatch.

``source: {kind: model, path: DIR}`` loads a local Hugging Face checkpoint directory with
``transformers.AutoModelForCausalLM.from_pretrained`` (``path: null``: the tiny model that
ships inside gradlens, loaded through exactly the same code). Never a download: a path that is
not a local directory is an error. The batch is built in five steps:

1. Rollout (gradlens.sources.rollout): the prompts are tokenised and completions sampled by a
   copy of the model in ``source.rollout_dtype`` (bf16 by default, the inference engine), at
   temperature T and top-p. It returns μ(y) = softmax(z_rollout/T)(y), the log-prob of each
   sampled token under the rollout pass (top-p truncation not renormalised, see below).
2. Rewards (gradlens.sources.rewards) → advantages by ``advantage.normalization`` over groups
   of ``group_size`` completions of one prompt, broadcast to the completion tokens.
3. π_old: the training pass (the model in ``dtype``, on ``device``) at the rollout parameters
   θ_old: log π_old(y) = log softmax(z/T)(y), z = W h with h the final hidden state (after the
   final norm). This is verl's recomputed ``old_log_probs``; μ is ``rollout_log_probs``.
4. Staleness (gradlens.sources.staleness): N optimizer steps on this batch, θ_old → θ.
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
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradlens.containers import Batch, valid_index
from gradlens.errors import GradlensError
from gradlens.logits import compute_logits
from gradlens.losses.token_selection import bonus_weights

if TYPE_CHECKING:
    from gradlens.model_results import ModelInfo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
ROLLOUT_DTYPES = {**DTYPES, "float16": torch.float16}


def builtin_model_dir() -> Path:
    """The directory of the tiny model that ships with gradlens (scripts/train_tiny_lm.py)."""
    return Path(str(importlib.resources.files("gradlens") / "data" / "tiny_lm"))


# ----------------------------------------------------------------------------- loading


def checkpoint_dir(path: str | None, key: str = "source.path") -> Path:
    """The checkpoint directory, checked for the files a causal LM needs; errors name ``key``."""
    if path is None:
        where = builtin_model_dir()
        if not (where / "config.json").is_file():
            raise GradlensError(
                f"{key}: the built-in model is missing from the installation ({where}); "
                "reinstall gradlens or run scripts/train_tiny_lm.py"
            )
        return where
    where = Path(path).expanduser()
    if not where.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = (
            "; it looks like a Hugging Face Hub id, but gradlens never downloads at run time: "
            f"download it first (e.g. `huggingface-cli download {path} --local-dir DIR`) "
            "and pass that DIR"
            if looks_like_hub_id
            else ""
        )
        raise GradlensError(f"{key}: {path!r} is not a local directory{hint}")
    if not where.is_dir():
        raise GradlensError(f"{key}: {path!r} is a file; give the checkpoint directory")
    if not (where / "config.json").is_file():
        raise GradlensError(
            f"{key}: {path!r} has no config.json; a Hugging Face checkpoint directory "
            "holds config.json, the weights (*.safetensors) and the tokenizer files"
        )
    if not any(any(where.glob(p)) for p in WEIGHT_PATTERNS):
        raise GradlensError(f"{key}: {path!r} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise GradlensError(
            f"{key}: {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))"
        )
    return where


@dataclass
class LoadedModel:
    """A checkpoint ready for rollouts and training passes."""

    model: Any  # a transformers PreTrainedModel in the training dtype, eval mode, on the device
    tokenizer: Any
    path: Path
    builtin: bool
    context: int | None  # max_position_embeddings (n_positions for GPT-2), None if unbounded

    @property
    def head(self) -> Any:
        return self.model.get_output_embeddings()

    @property
    def tied(self) -> bool:
        return bool(self.head.weight is self.model.get_input_embeddings().weight)

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    @property
    def bias(self) -> bool:
        """The lm_head has a bias (folded into W as a last column by `head_weight`)."""
        return getattr(self.head, "bias", None) is not None


def load_checkpoint(
    path: str | None, device: torch.device, dtype: torch.dtype, key: str = "source.path"
) -> LoadedModel:
    """Model and tokenizer from a local directory (never the Hub), with consistency checks.

    ``path`` None is the built-in model; every error names the config key ``key``.
    """
    where = checkpoint_dir(path, key)
    label = "the built-in model" if path is None else repr(path)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise GradlensError(f"source.kind model needs transformers ({exc})") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise GradlensError(
            f"{key}: transformers could not load a causal LM from {label}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as exc:
        raise GradlensError(
            f"{key}: transformers could not load the tokenizer of {label}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    model = model.to(device).eval()
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    loaded = LoadedModel(model, tokenizer, where, path is None, context)
    if loaded.head is None or not hasattr(loaded.head, "weight"):
        raise GradlensError(f"{key}: {label} has no lm_head (output embedding) to analyse")
    embedding_rows = int(model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > loaded.vocab_size or len(tokenizer) > embedding_rows:
        raise GradlensError(
            f"{key}: tokenizer mismatch in {label}: the tokenizer has {len(tokenizer)} "
            f"tokens but the model's lm_head has {loaded.vocab_size} rows and its embedding "
            f"{embedding_rows}; the tokenizer files belong to a different model"
        )
    return loaded


# ----------------------------------------------------------------------------- training pass


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

    @property
    def tokens(self) -> Tensor:
        return self.input_ids[:, 1:]  # [N, T]


def position_ids(attention_mask: Tensor) -> Tensor:
    """[N, L] positions that count real tokens only, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def head_weight(model: Any) -> Tensor:
    """[V, H] lm_head weight, or [V, H + 1] with the bias as the last column."""
    head = model.get_output_embeddings()
    weight = head.weight
    bias = getattr(head, "bias", None)
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def final_hidden(model: Any, seqs: Sequences, temperature: float, bias: bool) -> Tensor:
    """[N, T, H(+1)] h_t/T: final hidden states (after the final norm) that predict token t+1."""
    base = model.base_model
    h = base(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
        use_cache=False,
    ).last_hidden_state[:, :-1]  # [N, T, H]
    h = h / temperature if temperature != 1.0 else h
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)  # [N, T, H + 1]
    return h


@dataclass(frozen=True)
class PolicyPass:
    """log π of the sampled tokens on the [N, T] grid, and the full [M, V] log-probs."""

    logp: Tensor  # [N, T] log π(y_t) at the valid tokens, 0 elsewhere (differentiable)
    log_probs: Tensor  # [M, V] log π_t of the valid tokens (the entropy bonus needs them)


def policy_pass(hidden: Tensor, weight: Tensor, tokens: Tensor, mask: Tensor) -> PolicyPass:
    """log π(y_t) over the valid tokens from the final hidden states and the lm_head.

    The same operations in the same order as `gradlens.grads.softmax_view`, so that values
    computed here and there are bit-identical for the same hidden states and weight.
    """
    rows, cols = valid_index(mask)
    logits = compute_logits(hidden[rows, cols], weight)  # [M, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    sampled = log_probs.gather(-1, tokens[rows, cols][:, None]).squeeze(-1)  # [M]
    logp = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device)
    return PolicyPass(logp.index_put((rows, cols), sampled), log_probs)  # [N, T], [M, V]


def aggregated_loss(spec: Any, batch: Batch, policy: PolicyPass, params: Any, agg: Any) -> Tensor:
    """The scalar loss of one registered loss as a trainer minimises it, differentiable.

    The same composition as `gradlens.grads.autograd_reference`: the loss's terms with the
    run's corrections, its aggregation weights, and the entropy bonus when one is set.
    """
    from gradlens.grads import loss_terms, loss_weights, on_grid, run_params, token_inputs

    params = run_params(params, agg)
    rows, cols = valid_index(batch.mask)
    entropy = -(policy.log_probs.exp() * policy.log_probs).sum(-1)  # [M]
    grid = on_grid(entropy.detach(), rows, cols, policy.logp.shape)  # [N, T] H_t
    inputs = token_inputs(batch, policy.logp, grid)
    terms = loss_terms(inputs, spec, params)
    weights, agg_weights = loss_weights(batch.mask, terms, agg, policy.logp.dtype)
    loss = (weights * terms.per_token).sum()
    if params.entropy_coef != 0.0:
        a = bonus_weights(agg_weights, inputs, params)[rows, cols]  # [M] a_t·S_t
        loss = loss - params.entropy_coef * (a * entropy).sum()
    return loss


# Relative difference allowed between the model's own logits and W·h: the two compute the same
# product, through the same kernels up to the order of operations; a model with logit
# soft-capping or scaling is off by far more (tens of per cent).
LOGIT_PATH_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
LOGIT_PATH_TOLERANCE_LOW = 3e-2  # bf16/fp16: a few roundings of 2^-8


@torch.no_grad()
def check_logit_path(
    loaded: LoadedModel, prompt: list[int], device: torch.device, key: str = "source.path"
) -> None:
    """The model's logits must be lm_head(final hidden state): z = W h (+ b)."""
    model = loaded.model
    ids = torch.tensor([prompt], device=device)  # [1, P]
    seqs = Sequences(
        ids,
        torch.ones_like(ids),
        torch.arange(ids.shape[1], device=device)[None],
        torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=device),
    )
    weight = head_weight(model)
    ours = compute_logits(final_hidden(model, seqs, 1.0, loaded.bias), weight)  # [1, P-1, V]
    theirs = model(input_ids=ids, use_cache=False).logits[:, :-1].to(ours.dtype)
    err = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))
    tol = LOGIT_PATH_TOLERANCE.get(weight.dtype, LOGIT_PATH_TOLERANCE_LOW)
    if not err <= tol:
        raise GradlensError(
            f"{key}: this model's logits are not lm_head(final hidden state) (relative "
            f"difference {err:.3g} > {tol:g}; logit soft-capping or scaling?): gradlens's lm_head "
            "analysis needs z = W·h"
        )


@dataclass
class ModelContext:
    """What `gradlens.diagnostics.model_grads` needs to run a loss through the whole model.

    The final hidden states of ``sequences`` (`final_hidden`: [N, L − 1] columns) from column
    ``offset`` on are the batch's [N, T] grid: ``offset`` 0 for the model source, whose grid is
    the whole sequence; P − 1 for a batch file with P prompt columns, whose grid is the response
    (column P + t − 1 predicts response token t).
    """

    model: Any  # the transformers model at θ_N
    sequences: Sequences
    temperature: float
    bias: bool
    report: Any  # gradlens.model_results.ModelReport, without the per-loss parts
    offset: int = 0
    keys: str = "source.kind: model"  # the settings that asked for it, named by errors


def model_info(loaded: LoadedModel, dtype: torch.dtype, rollout_dtype: str | None) -> ModelInfo:
    """The `gradlens.model_results.ModelInfo` of a loaded checkpoint."""
    from gradlens.model_results import ModelInfo

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
        train_dtype=str(dtype).removeprefix("torch."),
        rollout_dtype=rollout_dtype,
    )


# ----------------------------------------------------------------------------- the builder


def build_model_batch(src: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Batch:
    """The batch described by a `ModelSource` section (see the module docstring)."""
    from gradlens.advantages import advantages_from_rewards
    from gradlens.compare import loss_params
    from gradlens.diagnostics.mismatch import mismatch_stats
    from gradlens.grads import Aggregation
    from gradlens.losses import get_loss
    from gradlens.model_results import ModelReport, RolloutSample, RolloutSummary
    from gradlens.sources.rewards import load_reward, score
    from gradlens.sources.rollout import choose_prompts, sample, tokenize_prompts
    from gradlens.sources.staleness import stale_steps

    reward_fn = load_reward(src.reward)
    stale_spec = get_loss(src.stale.loss)
    loaded = load_checkpoint(src.path, device, dtype)
    prompts, prompt_key = choose_prompts(src, loaded, config.seed)
    prompt_ids = tokenize_prompts(prompts, prompt_key, loaded, src.max_new_tokens)
    if len(prompt_ids[0]) > 1:
        check_logit_path(loaded, prompt_ids[0], device)

    rollout_dtype = ROLLOUT_DTYPES[src.rollout_dtype]
    roller = (
        loaded.model if rollout_dtype == dtype else copy.deepcopy(loaded.model).to(rollout_dtype)
    )
    gen = torch.Generator().manual_seed(config.seed)
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
    )
    del roller  # the rollout copy is not needed any more

    n = rollout.sequences.input_ids.shape[0]
    group_prompts = [p for p in prompts for _ in range(src.group_size)]
    rewards = score(reward_fn, src.reward, group_prompts, rollout.completions)
    adv, note = advantages_from_rewards(
        torch.tensor(rewards, dtype=torch.float64),
        config.advantage.normalization,
        src.group_size,
        config.advantage.eps,
    )
    seqs = rollout.sequences
    mask = seqs.loss_mask
    bias = loaded.bias

    params = loss_params(config)
    agg = Aggregation(config.loss.aggregation, config.loss.loss_scale_factor)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    advantages = (adv.to(device)[:, None] * mask).to(acc)  # [N, T], 0 off the completion
    stale = stale_steps(
        loaded.model,
        seqs,
        advantages.to(device),
        rollout.rollout_logp,
        src,
        stale_spec,
        params,
        agg,
        bias,
    )
    hidden, old_logp, staleness = stale.hidden, stale.old_logp, stale.staleness
    weight = head_weight(loaded.model).detach().clone()

    model = loaded.model
    info = model_info(loaded, dtype, src.rollout_dtype)
    lengths = mask.sum(-1)
    reward_t = torch.tensor(rewards, dtype=torch.float64)
    summary = RolloutSummary(
        prompts=len(prompts),
        group_size=src.group_size,
        sequences=n,
        completion_tokens=int(mask.sum()),
        mean_completion_length=float(lengths.double().mean()),
        stopped_at_eos=rollout.stopped,
        max_new_tokens=src.max_new_tokens,
        temperature=src.temperature,
        top_p=src.top_p,
        reward=src.reward,
        mean_reward=float(reward_t.mean()),
        reward_std=float(reward_t.std()) if n > 1 else 0.0,
        logp_definition=(
            f"π_θ, π_old (training pass, {info.train_dtype}) and μ (rollout pass, "
            f"{src.rollout_dtype}) are all softmax(z/T)(y) with T = {src.temperature}; top-p "
            "only restricts sampling and is not renormalised"
        ),
        samples=[
            RolloutSample(
                sequence=i,
                prompt=group_prompts[i],
                completion=rollout.completions[i],
                tokens=int(lengths[i]),
                reward=rewards[i],
            )
            for i in range(n)
        ],
    )
    report = ModelReport(
        model=info,
        rollout=summary,
        mismatch=mismatch_stats(old_logp, rollout.rollout_logp, mask, info),
        staleness=staleness,
        sft_over_rl=[],
    )
    name = "built-in tiny_lm" if loaded.builtin else f"{loaded.path.name}"
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
        groups=torch.arange(n, device=device) // src.group_size,  # consecutive completions
        source=(
            f"model: {name} ({info.architecture}, {info.parameters / 1e6:.2f}M parameters"
            f"{', tied embeddings' if info.tied_embeddings else ''}); {len(prompts)} prompts × "
            f"{src.group_size} completions ≤ {src.max_new_tokens} tokens, T = {src.temperature}, "
            f"top-p {src.top_p}; μ in {src.rollout_dtype}; {src.stale.steps} stale "
            f"{src.stale.optimizer} step(s) on {src.stale.loss}; reward {src.reward}"
        ),
        advantage_note=note,
        model_context=ModelContext(model, seqs, src.temperature, bias, report),
    )


def read_builtin_prompts() -> list[str]:
    """The prompts shipped with the built-in model (held-out def/class lines)."""
    path = builtin_model_dir() / "prompts.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GradlensError(
            f"source.prompts: the built-in prompts cannot be read ({exc}); give source.prompts"
        ) from None
    return list(data["prompts"])
