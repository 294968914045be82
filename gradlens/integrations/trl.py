"""gradlens inside TRL's ``GRPOTrainer``: the real batch diagnosed every few steps.

::

    from gradlens.integrations.trl import GradlensGRPOTrainer, GradlensSettings

    trainer = GradlensGRPOTrainer(
        model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
        gradlens=GradlensSettings(every_n_steps=10, spike_factor=3.0),
    )
    trainer.train()   # gradlens/* metrics in trainer.state.log_history, TensorBoard, W&B, ...

TRL's callbacks never see the batch, so the hook is a subclass: `GradlensGRPOMixin` put in
front of ``GRPOTrainer`` (``GradlensGRPOTrainer``) or of any subclass of it
(`gradlens_trainer`). It overrides three methods and changes nothing the trainer computes:

- ``_compute_loss`` (the one place TRL turns a batch into its loss): it lets TRL compute the
  loss, then takes what TRL already has: the completion tokens, the loss mask
  (``completion_mask`` × ``tool_mask``), the advantages and the old, reference and sampling
  log-probs (``old_per_token_logps``, ``ref_per_token_logps``, ``sampling_per_token_logps``;
  without the old ones TRL is on-policy and so is the diagnosis, r = 1 exactly);
- a forward hook on the lm_head's input: the final hidden states the backbone returns (the
  backbone, ``model.base_model``, and not ``lm_head`` itself, because TRL ≥ 1.15 applies
  ``lm_head.weight`` inside a fused, chunked head whose ``lm_head.forward`` never runs; on
  older TRL the same hook sees the same tensor). Completion token t is predicted by the state
  at column −(k+1)+t of the k completion columns. TRL divides the logits by
  ``args.temperature`` (and multiplies them by the model's ``logit_scale`` where it has one),
  so the states are handed to gradlens multiplied by scale/τ: π = softmax(W·h·scale/τ) is the
  policy TRL trains, and ‖∂L/∂W‖ is the lm_head gradient of TRL's loss;
- ``_get_grad_norm`` (transformers' Trainer calls it once per optimizer step, after the
  backward and before ``optimizer.step()``, so the lm_head weight is still the one that
  produced the batch): the spike rule
  (grad_norm > ``spike_factor`` × the running median of the earlier steps,
  `gradlens.diagnostics.spikes`), the batch file of a spike step, and one line of the run's
  ``metrics.jsonl`` (`gradlens.run_files`).

Every ``every_n_steps`` steps (and on every spike step) each micro-batch is diagnosed by
`gradlens.diagnose` with the trainer's own loss settings mapped (`trl_loss_settings`), and
``report.metrics()`` goes into TRL's metric lists, which its ``log`` averages per logging step.

Memory: the step's hidden states ([B, k, H] per micro-batch, detached: no copy, no graph) are
held until the step ends, so that a spike can be dumped. Liger: TRL ≤ 1.13 with
``use_liger_kernel`` computes its loss in ``compute_liger_loss`` and never calls
``_compute_loss``; the hook refuses that combination at construction. From TRL 1.15 on Liger
only swaps layer kernels and the loss still runs through ``_compute_loss``: the hook works.
Models whose logits are soft-capped (``final_logit_softcapping``) are refused: their logits are
not W·h. Under several processes each rank diagnoses its own micro-batches; only the main
process writes files.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.api import build_batch, diagnose
from gradlens.batchfile import SUFFIXES, write_batch
from gradlens.diagnostics.spikes import ratio_spike
from gradlens.errors import GradlensError
from gradlens.run_files import (
    METRICS_FILE,
    append_jsonl,
    finite_or_none,
    sidecar_path,
    step_stem,
    write_json,
)
from gradlens.sources.batch import dump_tensors
from gradlens.sources.tokenizer_digest import vocabulary_sha256

# TRL's loss_type → (gradlens aggregation, count_empty_sequences): TRL's normaliser (docs/losses.md
# §9; checked against TRL's own _compute_loss in tests/losses/test_frameworks.py). dapo and
# cispo divide by num_items_in_batch, the generation batch's tokens: the micro-batch's tokens
# when steps_per_generation = gradient_accumulation_steps = 1.
AGGREGATION = {
    "grpo": ("seq_mean_token_mean", True),
    "sapo": ("seq_mean_token_mean", True),
    "bnpo": ("token_mean", False),
    "dapo": ("token_mean", False),
    "cispo": ("token_mean", False),
    "dr_grpo": ("seq_mean_token_sum_norm", True),
    "luspo": ("seq_mean_token_sum", True),
}
DEFAULT_DIR = "gradlens"  # under args.output_dir


@dataclass(frozen=True)
class GradlensSettings:
    """What the hook does; every field is checked at construction (errors name it)."""

    every_n_steps: int = 10  # diagnose the steps s with s % every_n_steps == 0
    spike_factor: float | None = 3.0  # dump a step whose grad_norm > this × running median
    spike_window: int = 50  # the running median's earlier steps
    spike_min_history: int = 3  # judge no step before this many earlier steps
    output_dir: str | None = None  # metrics.jsonl and batch files; None: args.output_dir/gradlens
    losses: tuple[str, ...] | None = None  # None: the trainer's own loss, mapped
    extra_losses: tuple[str, ...] = ()  # diagnosed beside it, e.g. ("reinforce", "sft")
    loss: Mapping[str, Any] = field(default_factory=dict)  # overrides of the mapped `loss`
    diagnostics: Mapping[str, Any] = field(default_factory=dict)  # the `diagnostics` section
    model_path: str | None = None  # the sidecar's model_path; None: the model's name_or_path
    batch_suffix: str = ".safetensors"

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> GradlensError:
            return GradlensError(f"GradlensSettings.{name}: {what}")

        if self.every_n_steps < 1:
            raise bad("every_n_steps", f"must be ≥ 1 (1: every step); got {self.every_n_steps}")
        if self.spike_factor is not None and not self.spike_factor > 0:
            raise bad(
                "spike_factor", f"must be > 0, or None to dump no batch; got {self.spike_factor}"
            )
        if self.spike_window < 1:
            raise bad("spike_window", f"must be ≥ 1; got {self.spike_window}")
        if self.spike_min_history < 1:
            raise bad("spike_min_history", f"must be ≥ 1; got {self.spike_min_history}")
        if self.batch_suffix not in SUFFIXES:
            raise bad("batch_suffix", f"one of {', '.join(SUFFIXES)}; got {self.batch_suffix!r}")
        for name in ("losses", "extra_losses"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise bad(name, f"a tuple of loss names, not the string {value!r}")


def trl_loss_settings(trainer: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The gradlens losses and ``loss`` section that reproduce a GRPOTrainer's loss.

        TRL                                gradlens
        loss_type grpo/bnpo/dapo/...       ppo_clip, with the loss_type's aggregation
        importance_sampling_level=sequence gspo
        loss_type cispo / sapo             cispo_cap (cap = epsilon_high) / sapo (tau_pos/neg)
        epsilon, epsilon_high              loss.eps_low, loss.eps_high
        delta                              loss.dual_clip
        off_policy_mask_threshold          loss.opsm_delta (against the sampling log-probs)
        beta > 0 (ppo_clip)                grpo: loss.kl_coef = beta, loss.kl_estimator =
                                           unbiased (use_bias_correction_kl) or k3
        max_completion_length (dr_grpo)    loss.loss_scale_factor

    Not mapped (the diagnosis then leaves them out; docs/integrations.md): ``top_entropy_quantile``
    < 1, vLLM's importance-sampling correction, the entropy bonus, and the KL term on top of
    gspo, cispo or sapo.
    """
    args = trainer.args
    loss_type = str(trainer.loss_type)
    if loss_type not in AGGREGATION:
        raise GradlensError(
            f"GradlensSettings.losses: TRL's loss_type {loss_type!r} has no gradlens twin (mapped: "
            f"{', '.join(sorted(AGGREGATION))}); name the losses to diagnose, e.g. "
            "GradlensSettings(losses=('ppo_clip',))"
        )
    mode, all_rows = AGGREGATION[loss_type]
    loss: dict[str, Any] = {
        "aggregation": mode,
        "count_empty_sequences": all_rows,
        "eps_low": float(trainer.epsilon_low),
        "eps_high": float(trainer.epsilon_high),
    }
    if loss_type == "dr_grpo":
        loss["loss_scale_factor"] = float(args.max_completion_length)
    delta = getattr(args, "delta", None)
    if delta is not None:
        loss["dual_clip"] = float(delta)
    opsm = getattr(args, "off_policy_mask_threshold", None)
    if opsm is not None:
        loss["opsm_delta"] = float(opsm)
    if loss_type == "cispo":
        name = "cispo_cap"
        loss["cispo_cap"] = float(trainer.epsilon_high)
    elif loss_type == "sapo":
        name = "sapo"
        loss["tau_pos"] = float(args.sapo_temperature_pos)
        loss["tau_neg"] = float(args.sapo_temperature_neg)
    elif getattr(trainer, "importance_sampling_level", "token") == "sequence":
        name = "gspo"
    else:
        name = "ppo_clip"
    beta = float(getattr(trainer, "beta", 0.0) or 0.0)
    if beta > 0 and name == "ppo_clip":
        name = "grpo"
        loss["kl_coef"] = beta
        loss["kl_estimator"] = (
            "unbiased" if getattr(args, "use_bias_correction_kl", False) else "k3"
        )
    return (name,), loss


@dataclass
class MicroBatch:
    """One ``_compute_loss`` call's tensors, detached, on the [B, k] completion grid."""

    hidden: Tensor  # [B, k, H] · scale/τ
    weight: Tensor  # [V, H]
    tokens: Tensor
    mask: Tensor
    advantages: Tensor  # [B] or [B, k]
    old_logp: Tensor | None
    ref_logp: Tensor | None
    rollout_logp: Tensor | None
    prompts: Tensor  # [B, P] left-padded
    prompt_mask: Tensor


@dataclass
class HookState:
    capturing: bool = False
    hidden: list[Tensor] = field(default_factory=list)
    micro: list[MicroBatch] = field(default_factory=list)
    step_metrics: list[dict[str, float]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)


def _pad(tensors: list[Tensor | None], width: int, left: bool = False) -> Tensor | None:
    if any(t is None for t in tensors):
        return None
    padded = []
    for t in tensors:
        assert t is not None
        extra = width - t.shape[1]
        if extra:
            fill = torch.zeros(t.shape[0], extra, *t.shape[2:], dtype=t.dtype, device=t.device)
            t = torch.cat([fill, t] if left else [t, fill], dim=1)
        padded.append(t)
    return torch.cat(padded, dim=0)


def concat_micro(micro: list[MicroBatch]) -> tuple[dict[str, Tensor | None], Tensor, Tensor]:
    """The step's micro-batches as one batch: responses right-padded, prompts left-padded."""
    width = max(m.tokens.shape[1] for m in micro)
    prompt_width = max(m.prompts.shape[1] for m in micro)

    def adv(m: MicroBatch) -> Tensor:
        a = m.advantages
        return a[:, None].expand(m.tokens.shape) if a.dim() == 1 else a

    def pad(name: str) -> Tensor | None:
        return _pad([getattr(m, name) for m in micro], width)

    args = {
        "hidden": pad("hidden"),
        "tokens": pad("tokens"),
        "mask": pad("mask"),
        "advantages": _pad([adv(m) for m in micro], width),
        "old_logp": pad("old_logp"),
        "ref_logp": pad("ref_logp"),
        "rollout_logp": pad("rollout_logp"),
    }
    prompts = _pad([m.prompts for m in micro], prompt_width, left=True)
    prompt_mask = _pad([m.prompt_mask for m in micro], prompt_width, left=True)
    assert prompts is not None and prompt_mask is not None
    return args, prompts, prompt_mask


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in rows for k in row})
    return {k: statistics.fmean(row[k] for row in rows if k in row) for k in keys}


class GradlensGRPOMixin:
    """Put in front of ``GRPOTrainer`` (or a subclass of it): see the module docstring."""

    # set by GRPOTrainer / transformers' Trainer
    args: Any
    state: Any
    model: Any
    accelerator: Any
    temperature: float
    _metrics: Any

    def __init__(self, *args: Any, gradlens: GradlensSettings | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gradlens_settings = settings = gradlens or GradlensSettings()
        if getattr(self, "use_liger_kernel", False) and hasattr(self, "compute_liger_loss"):
            raise GradlensError(
                "GradlensSettings: this TRL computes the loss with Liger (use_liger_kernel=True, "
                "compute_liger_loss) and never runs _compute_loss, where gradlens looks; set "
                "use_liger_kernel=False, or use TRL ≥ 1.15, where Liger keeps _compute_loss"
            )
        if not hasattr(super(), "_get_grad_norm"):
            raise GradlensError(
                "GradlensSettings: this transformers Trainer has no _get_grad_norm, where the hook "
                "reads each step's grad_norm; use transformers ≥ 5"
            )
        mapped, loss = trl_loss_settings(self) if settings.losses is None else ((), {})
        losses = tuple(settings.losses or mapped) + tuple(settings.extra_losses)
        self.gradlens_losses: tuple[str, ...] = tuple(dict.fromkeys(losses))
        self.gradlens_loss: dict[str, Any] = {**loss, **dict(settings.loss)}
        base = self._gradlens_base()
        config = getattr(base, "config", None)
        text = getattr(config, "get_text_config", lambda: config)()
        if getattr(text, "final_logit_softcapping", None) is not None:
            raise GradlensError(
                "GradlensSettings: the model soft-caps its logits (config.final_logit_softcapping)"
                "; they are not W·h, which every gradlens diagnosis assumes"
            )
        scale = getattr(text, "logit_scale", None)
        self._gradlens_scale = (1.0 if scale is None else float(scale)) / float(self.temperature)
        self._gradlens_state = HookState()
        self._gradlens_hook = base.base_model.register_forward_hook(self._gradlens_on_backbone)
        out = settings.output_dir or str(Path(self.args.output_dir) / DEFAULT_DIR)
        self.gradlens_dir = Path(out)

    # ------------------------------------------------------------------ capture

    def _gradlens_base(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _gradlens_on_backbone(self, module: Any, args: Any, output: Any) -> None:
        if self._gradlens_state.capturing:
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0]
            self._gradlens_state.hidden.append(hidden.detach())

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        state = self._gradlens_state
        if not model.training:
            return super()._compute_loss(model, inputs)  # type: ignore[misc]
        state.capturing, state.hidden = True, []
        try:
            loss = super()._compute_loss(model, inputs)  # type: ignore[misc]
        finally:
            state.capturing = False
        micro = self._gradlens_micro(inputs)
        state.hidden = []
        if micro is not None:
            state.micro.append(micro)
            if (self.state.global_step + 1) % self.gradlens_settings.every_n_steps == 0:
                self._gradlens_log(micro)
        return loss

    def _gradlens_micro(self, inputs: dict[str, Any]) -> MicroBatch | None:
        hidden_chunks = self._gradlens_state.hidden
        if not hidden_chunks:
            return None
        tokens = inputs["completion_ids"]
        k = tokens.shape[1]
        full = torch.cat(hidden_chunks, dim=0)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        weight = self._gradlens_base().get_output_embeddings().weight.detach()
        return MicroBatch(
            hidden=full[:, -(k + 1) : -1] * self._gradlens_scale,
            weight=weight,
            tokens=tokens.detach(),
            mask=mask.detach().bool(),
            advantages=inputs["advantages"].detach(),
            old_logp=_detached(inputs.get("old_per_token_logps")),
            ref_logp=_detached(inputs.get("ref_per_token_logps")),
            rollout_logp=_detached(inputs.get("sampling_per_token_logps")),
            prompts=inputs["prompt_ids"].detach(),
            prompt_mask=inputs["prompt_mask"].detach(),
        )

    # ------------------------------------------------------------------ diagnose

    def gradlens_diagnose(self, micro: MicroBatch) -> dict[str, float]:
        """``report.metrics()`` of one micro-batch ({} when no token enters its loss)."""
        if not bool(micro.mask.any()):
            return {}
        report = diagnose(
            micro.hidden,
            micro.weight,
            micro.tokens,
            micro.mask,
            micro.advantages,
            micro.old_logp,
            micro.rollout_logp,
            micro.ref_logp,
            losses=self.gradlens_losses,
            loss=self.gradlens_loss,
            diagnostics=self.gradlens_settings.diagnostics,
        )
        return report.metrics()

    def _gradlens_log(self, micro: MicroBatch) -> None:
        metrics = self.gradlens_diagnose(micro)
        self._gradlens_state.step_metrics.append(metrics)
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)

    # ------------------------------------------------------------------ step end

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm)  # type: ignore[misc]
        try:
            self._gradlens_step_end(norm)
        finally:
            state = self._gradlens_state
            state.micro, state.step_metrics = [], []
        return norm

    def _gradlens_step_end(self, grad_norm: Any) -> None:
        settings, state = self.gradlens_settings, self._gradlens_state
        step = int(self.state.global_step) + 1  # counted after the optimizer step
        norm = math.nan if grad_norm is None else float(grad_norm)
        history = state.grad_norms[-settings.spike_window :]
        past = [x for x in history if math.isfinite(x)]
        median = statistics.median(past) if past else None
        spike = settings.spike_factor is not None and ratio_spike(
            norm, history, settings.spike_factor, settings.spike_min_history
        )
        state.grad_norms.append(norm)
        batch_file = None
        if spike and state.micro:
            if not state.step_metrics:  # a step between diagnosed ones: diagnose it now
                for micro in state.micro:
                    self._gradlens_log(micro)
            if self.accelerator.is_main_process:
                batch_file = self._gradlens_dump(step, norm, median)
        if self.accelerator.is_main_process:
            row = {
                "step": step,
                "grad_norm": finite_or_none(norm),
                "running_median": finite_or_none(median),
                "spike": bool(spike),
                "batch_file": batch_file,
                **_mean_metrics([m for m in state.step_metrics if m]),
            }
            append_jsonl(self.gradlens_dir / METRICS_FILE, row)

    def _gradlens_dump(self, step: int, norm: float, median: float | None) -> str:
        settings = self.gradlens_settings
        args, prompts, prompt_mask = concat_micro(self._gradlens_state.micro)
        weight = self._gradlens_state.micro[0].weight
        batch = build_batch(
            args["hidden"],
            weight,
            args["tokens"],
            args["mask"],
            args["advantages"],
            args["old_logp"],
            args["rollout_logp"],
            args["ref_logp"],
        )
        tensors = dump_tensors(batch)
        assert tensors["mask"] is not None
        attention = torch.cat([prompt_mask.long(), tensors["mask"].long()], dim=1)
        # the trainer's tokenizer made the ids: a read-back with another one is refused
        digest = vocabulary_sha256(getattr(self, "processing_class", None))
        tensors.update(prompts=prompts, attention=attention, tokenizer_sha256=digest)
        path = self.gradlens_dir / (step_stem(step) + settings.batch_suffix)
        write_batch(path, tensors)
        base = self._gradlens_base()
        write_json(
            sidecar_path(path),
            {
                "step": step,
                "grad_norm": finite_or_none(norm),
                "running_median": finite_or_none(median),
                "spike_factor": settings.spike_factor,
                "framework": f"trl {_trl_version()}",
                "model_path": settings.model_path
                or getattr(getattr(base, "config", None), "_name_or_path", None),
                "checkpoint": _newest_checkpoint(Path(self.args.output_dir), step),
                "temperature": float(self.temperature),
                "dtype": str(weight.dtype).removeprefix("torch."),
                "losses": list(self.gradlens_losses),
                "loss": self.gradlens_loss,
                "diagnostics": dict(settings.diagnostics),
            },
        )
        return path.name


def _detached(value: Any) -> Tensor | None:
    return value.detach() if isinstance(value, Tensor) else None


def _newest_checkpoint(output_dir: Path, step: int) -> str | None:
    """The newest ``checkpoint-N`` (N < step) the trainer saved: the parameters closest to the
    ones that produced the step's batch (a checkpoint saved at step s holds the parameters
    after s's update)."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        tail = path.name.removeprefix("checkpoint-")
        if tail.isdigit() and int(tail) < step:
            found.append((int(tail), path))
    return str(max(found)[1]) if found else None


def _trl_version() -> str:
    import trl

    return str(trl.__version__)


def gradlens_trainer(trainer_class: type) -> type:
    """``trainer_class`` (GRPOTrainer or a subclass of it) with the gradlens hook in front."""
    return type(f"Gradlens{trainer_class.__name__}", (GradlensGRPOMixin, trainer_class), {})


def __getattr__(name: str) -> Any:
    """``GradlensGRPOTrainer``: built on first use, so that importing this module needs no TRL."""
    if name == "GradlensGRPOTrainer":
        try:
            from trl import GRPOTrainer
        except ImportError as exc:
            raise GradlensError(
                f"GradlensGRPOTrainer needs TRL: pip install 'gradlens[trl]' ({exc})"
            ) from None
        cls = gradlens_trainer(GRPOTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
