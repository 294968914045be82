"""TRL's GRPO loss, called as TRL's own code: ``trl:grpo``, ``trl:dapo``, ``trl:gspo``, ...

``trl:<loss_type>`` runs the real ``GRPOTrainer._compute_loss`` of the installed TRL on
gradlens's log-probs. The trainer is built by TRL's own ``GRPOTrainer.__init__`` from a real
``GRPOConfig`` (on gradlens's built-in tiny model, which the loss never runs: a subclass
overrides ``_get_per_token_logps_and_entropies``, the one place ``_compute_loss`` touches the
model, to return the [N, T] log-prob leaf). Every attribute the loss reads is thus set by TRL
itself, from its own defaults. A new trainer is built for every call: a ``GRPOConfig``
resets accelerate's shared state, which would break an older trainer (about 20 ms each after
the first).

    GRPOConfig                      gradlens                        note
    loss_type                       the name: grpo, bnpo, dr_grpo,  gspo = grpo with
                                    dapo, luspo, cispo, sapo, vespo importance_sampling_level
                                                                    = "sequence" (TRL's recipe)
    epsilon                         loss.eps_low
    epsilon_high                    loss.eps_high; cispo:           TRL's default is epsilon;
                                    loss.cispo_cap                  for cispo an absolute cap
    delta                           loss.dual_clip                  INTELLECT-2's upper clip
    off_policy_mask_threshold       loss.opsm_delta                 sampling log-probs: the
                                                                    batch's rollout_logp
    sapo_temperature_pos/_neg       loss.tau_pos, loss.tau_neg
    max_completion_length           loss.loss_scale_factor, else    dr_grpo divides by
                                    the padded length T             B·max_completion_length
    beta                            0; with +kl loss.kl_coef        TRL's default is 0
    use_bias_correction_kl          loss.kl_estimator: unbiased     k3·r with r not detached
                                    → True, k3 → False              (True is TRL's default
                                                                    from 1.10)

TRL's aggregation is part of its loss_type (grpo, sapo: seq-mean over B, every row; bnpo:
token mean; dapo, cispo, vespo: Σ/num_items_in_batch, which gradlens sets to the batch's valid
tokens; dr_grpo: Σ/(B·max_completion_length); luspo: Σ/B), so ``loss.aggregation`` does not
reach it; the parity check names the factor when it differs. ``loss.corrections`` are not
passed: TRL computes its vLLM importance ratio inside generation
(``_generate_and_score_completions``), not in the loss; the report says so. TRL's entropy bonus
is off (gradlens's ``loss.entropy_coef`` applies to every loss alike).

Supported: TRL 1.10 to 1.16 (``_compute_loss`` read in 1.10.0–1.16.0: the same structure,
``use_bias_correction_kl`` defaulting to True), tested with 1.16.0.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.aggregation import Aggregation
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.external import Call, autograd_terms, raised, reported_metrics, scalar_loss
from gradlens.losses.frameworks.base import Framework, require, split_kl, unknown_framework_loss

TINY_LM = Path(__file__).resolve().parents[2] / "data" / "tiny_lm"  # never run by the loss
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
NAMES = (*LOSS_TYPES, "gspo")
TRL_KL = {"k3": False, "unbiased": True}  # gradlens estimator → use_bias_correction_kl
UNREPORTED = ("entropy",)  # TRL's entropy metric: gradlens hands it zeros
INSTALL = 'pip install -e ".[frameworks]"   (or: pip install "trl==1.16.0")'


@dataclass(frozen=True)
class TrlApi:
    """The pieces of the installed TRL that gradlens calls, and the model it never runs."""

    version: str
    trainer_class: Any
    config_class: Any
    dataset: Any
    model: Any
    tokenizer: Any


@contextmanager
def _quiet() -> Iterator[None]:
    """TRL and transformers warn about a CPU-only, never-trained trainer; those are not news."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


@cache
def trl_api(name: str) -> TrlApi:
    """Import the installed TRL (8–15 s) and load the tiny model once per process."""
    version = require(FRAMEWORK, name)
    try:
        with _quiet():
            from datasets import Dataset
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import GRPOConfig, GRPOTrainer

            tokenizer = AutoTokenizer.from_pretrained(TINY_LM)
            model = AutoModelForCausalLM.from_pretrained(TINY_LM, dtype=torch.float32)
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: importing TRL {version} raised {raised(exc)}"
        ) from None

    class LogProbTrainer(GRPOTrainer):  # type: ignore[misc, valid-type]
        """GRPOTrainer whose per-token log-probs are gradlens's [N, T] leaf."""

        gradlens_logp: Tensor

        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
            logp = self.gradlens_logp
            return logp, torch.zeros_like(logp.detach()), None  # (log-probs, entropies, aux)

    return TrlApi(version, LogProbTrainer, GRPOConfig, Dataset, model, tokenizer)


def grpo_config_values(
    loss_type: str, sequence: bool, with_kl: bool, params: LossParams, agg: Aggregation, t: int
) -> dict[str, Any]:
    """The ``loss`` section under GRPOConfig's names (the table in the module docstring)."""
    values: dict[str, Any] = {
        "loss_type": loss_type,
        "epsilon": params.eps_low,
        "epsilon_high": params.cispo_cap if loss_type == "cispo" else params.eps_high,
        "delta": params.dual_clip,
        "off_policy_mask_threshold": params.opsm_delta,
        "sapo_temperature_pos": params.tau_pos,
        "sapo_temperature_neg": params.tau_neg,
        "max_completion_length": int(agg.loss_scale_factor or t),
        "beta": params.kl_coef if with_kl else 0.0,
        "use_bias_correction_kl": TRL_KL.get(params.kl_estimator, False),
        "entropy_coef": 0.0,
    }
    if sequence:
        values["importance_sampling_level"] = "sequence"
    return values


def make_trainer(api: TrlApi, values: dict[str, Any], name: str) -> Any:
    """A trainer built by TRL's own ``__init__`` from a real GRPOConfig."""
    try:
        with _quiet():
            args = api.config_class(
                output_dir=tempfile.gettempdir(),
                report_to="none",
                use_cpu=True,
                per_device_train_batch_size=2,
                num_generations=2,
                **values,
            )
            trainer = api.trainer_class(
                model=api.model,
                processing_class=api.tokenizer,
                reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                args=args,
                train_dataset=api.dataset.from_dict({"prompt": ["def f():", "x ="]}),
            )
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: TRL {api.version} refused the GRPOConfig gradlens built from the "
            f"loss section: {raised(exc)}"
        ) from None
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); absent before it
    return trainer


def trl_inputs(logp: Tensor, inputs: TokenInputs, with_kl: bool) -> dict[str, Any]:
    """The batch as ``_compute_loss`` reads it, one generation batch = this micro-batch."""
    n, t = logp.shape
    m = inputs.mask
    adv = inputs.advantages
    first = adv.gather(1, m.to(torch.long).argmax(1, keepdim=True))  # [N, 1] first valid token
    constant = bool(torch.where(m, adv == first, True).all())
    batch: dict[str, Any] = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long, device=logp.device),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long, device=logp.device),
        "completion_ids": torch.zeros(n, t, dtype=torch.long, device=logp.device),
        "completion_mask": m.to(torch.long),
        "advantages": first[:, 0] if constant else adv,  # (B,) as TRL makes them, or (B, T)
        "num_items_in_batch": m.sum().to(logp.dtype),
        "old_per_token_logps": inputs.old_logp,
    }
    if with_kl:
        ref = inputs.ref_logp if inputs.ref_logp is not None else inputs.old_logp
        batch["ref_per_token_logps"] = ref
    if inputs.rollout_logp is not None:
        batch["sampling_per_token_logps"] = inputs.rollout_logp  # OPSM reads it
    return batch


def trl_call(api: TrlApi, loss_type: str, sequence: bool, with_kl: bool, name: str) -> Call:
    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, agg: Aggregation
    ) -> tuple[Tensor, dict[str, float]]:
        if with_kl and params.kl_estimator not in TRL_KL:
            raise GradlensError(
                f"loss {name!r}: TRL's KL is k3 (use_bias_correction_kl=False) or k3·r "
                "(True, gradlens unbiased); loss.kl_estimator = "
                f"{params.kl_estimator} has no TRL twin"
            )
        values = grpo_config_values(loss_type, sequence, with_kl, params, agg, logp.shape[-1])
        trainer = make_trainer(api, values, name)
        trainer.gradlens_logp = logp
        try:
            loss = trainer._compute_loss(trainer.model, trl_inputs(logp, inputs, with_kl))
        except Exception as exc:
            raise GradlensError(f"loss {name!r}: TRL raised {raised(exc)}") from None
        logged = trainer._metrics.get("train", {})
        reported = reported_metrics(
            (key, seen[-1]) for key, seen in logged.items() if seen and key not in UNREPORTED
        )
        return scalar_loss(loss, name, tuple(logp.shape)), reported

    return call


def resolve(name: str, rest: str) -> LossSpec:
    """The `LossSpec` of ``trl:<loss_type>[+kl]`` or ``trl:gspo[+kl]``."""
    base, with_kl = split_kl(rest)
    if base not in NAMES:
        raise GradlensError(unknown_framework_loss(FRAMEWORK, name, base, list(NAMES)))
    api = trl_api(name)
    sequence = base == "gspo"
    loss_type = "grpo" if sequence else base
    level = ", importance_sampling_level='sequence'" if sequence else ""
    kl = " + β·k3 (·r with use_bias_correction_kl)" if with_kl else ""
    return LossSpec(
        name=name,
        fn=None,
        aggregating_fn=autograd_terms(trl_call(api, loss_type, sequence, with_kl, name), name),
        formula=f"TRL {api.version} GRPOTrainer._compute_loss, loss_type={loss_type!r}{level}"
        f"{kl}; GRPOConfig from loss.* (losses.md §9)",
        grad_formula="∂L/∂ℓ_t by autograd through TRL's own code (exact)",
        zero_when="where TRL's gradient in ℓ_t is 0",
        paper=f"TRL {api.version}, GRPOTrainer._compute_loss",
        post_formula="|c|·(1 − π_y)",
        needs=("ref_logp",) if with_kl else (),
    )


FRAMEWORK = Framework(
    prefix="trl",
    distribution="trl",
    supported=((1, 10), (1, 17)),
    tested="1.16.0",
    install=INSTALL,
    names=NAMES,
    resolve=resolve,
)
