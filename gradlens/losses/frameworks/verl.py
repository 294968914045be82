"""verl's policy losses, called as verl's own code: ``verl:<loss_mode>`` and ``verl:module:fn``.

``verl:vanilla``, ``verl:gspo``, ``verl:sapo``, ``verl:cispo``, ``verl:gpg``, ... name the
functions registered in the installed verl's ``POLICY_LOSS_REGISTRY``
(``verl.trainer.ppo.core_algos``); each touches the logits only through ``log_prob``, so c_t is
exact by autograd (`gradlens.losses.external.autograd_terms`). gradlens calls them as verl's
engine worker does (``verl.workers.utils.losses.ppo_loss``, verl 0.9):

    fn(old_log_prob, log_prob, advantages, response_mask (bool), loss_agg_mode, config,
       rollout_is_weights)

with ``config`` verl's own frozen ``ActorConfig``, built from gradlens's ``loss`` section:

    ActorConfig            gradlens                      note
    clip_ratio(_low)       loss.eps_low                  cispo: loss.cispo_eps_low
    clip_ratio_high        loss.eps_high                 cispo: loss.cispo_eps_high
    clip_ratio_c           loss.dual_clip, inf if null   verl's default 3 is always on; inf
                                                         switches the dual clip off (verl
                                                         asserts c > 1); dppo_tv/dppo_kl:
                                                         loss.cispo_cap, their TIS cap
    loss_agg_mode          loss.aggregation              token_sum needs verl ≥ 0.9;
                                                         token_sum_norm has no verl ≥ 0.7 twin
    tau_pos, tau_neg       loss.tau_pos, loss.tau_neg    sapo
    policy_loss.dro_beta   loss.kl_coef                  dro: β of its penalty ½β(ℓ − ℓ_old)²
    global_batch_info      dp_size 1; global_batch_size B with loss.count_empty_sequences
                           (the trainer's ppo_mini_batch_size·n), else unset (B');
                           loss_scale_factor = loss.loss_scale_factor (the only way verl's
                           agg_loss reads it)

``loss.corrections`` go through verl's own ``compute_rollout_correction_and_rejection_mask``,
as the trainer calls it before the actor: token_tis → rollout_is=token, threshold high;
seq_tis → sequence; token_mis and icepop → token "low_high" (IcePop); seq_mis → sequence
"low_high"; geo_mask → rollout_rs=seq_mean_k1 with "1/high_1/low" (verl thresholds −log ρ,
trap A8); verl's rejection kinds (token_k1, ..., seq_max_k3) → their own rollout_rs options,
chained in order; ``batch_normalize`` → rollout_is_batch_normalize. Its IS weights are passed
as ``rollout_is_weights`` and its rejection mask as the response mask, so rejected tokens leave
every normaliser (compare ``renormalize: true``).
``bypass_mode`` takes ``old_log_prob`` := the rollout log-probs, as verl's trainer sets it.

``verl:<loss_mode>+kl`` adds verl's KL loss as ``ppo_loss`` does: ``kl_penalty(log_prob,
ref_log_prob, kl_loss_type)`` aggregated by ``agg_loss`` with the policy's ``loss_agg_mode`` and
batch info, times ``loss.kl_coef``; ``loss.kl_estimator`` k1 → k1, k2 → k2, k3 → low_var_kl
(clamped to ±10 by verl); verl has no ``unbiased``.

``verl:mypkg.mod:fn`` (or ``verl:path/file.py:fn``) calls any function of that signature the
same way. With a supported verl installed it receives the real ``ActorConfig``; without verl, a
read-only stand-in with verl's attribute names (`VerlConfig`: attribute, item and ``get``
access; unknown names read as None; ``global_batch_info`` an empty dict).

Supported: verl 0.7 to 0.9 (ActorConfig with ``global_batch_info``; read from 0.7.1, 0.8.0 and
0.9.1), tested with 0.9.1. verl ≤ 0.6 is refused: its ``agg_loss`` takes no batch info and its
seq-mean-token-sum-norm is Σ/L. Older functions returning ``(pg_loss, pg_clipfrac, ppo_kl,
pg_clipfrac_lower)`` are read positionally.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.aggregation import AGGREGATIONS, Aggregation, num_sequences
from gradlens.losses.base import Correction, LossParams, LossSpec
from gradlens.losses.corrections import KINDS
from gradlens.losses.external import (
    Call,
    autograd_terms,
    load_callable,
    raised,
    reported_metrics,
    scalar_loss,
)
from gradlens.losses.frameworks.base import (
    Framework,
    installed_version,
    is_supported,
    parse_version,
    require,
    split_kl,
    unknown_framework_loss,
)

# gradlens aggregation → verl loss_agg_mode, and the verl version that first has it
VERL_AGGREGATION = {
    "token_mean": ("token-mean", (0, 7)),
    "token_sum": ("token-sum", (0, 9)),
    "seq_mean_token_mean": ("seq-mean-token-mean", (0, 7)),
    "seq_mean_token_sum": ("seq-mean-token-sum", (0, 7)),
    "seq_mean_token_sum_norm": ("seq-mean-token-sum-norm", (0, 7)),
}
# gradlens KL estimator → verl kl_loss_type
VERL_KL = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}
# Older verl returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).
POSITIONAL_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
DPPO = ("dppo_tv", "dppo_kl")  # clip_ratio* are divergence bounds, clip_ratio_c the TIS cap
NAMES = (
    "vanilla",
    "gspo",
    "sapo",
    "cispo",
    "gpg",
    "clip_cov",
    "kl_cov",
    "geo_mean",
    "dppo_tv",
    "dppo_kl",
    "dro",
    "bypass_mode",
)
INSTALL = (
    'pip install -e ".[frameworks]" && pip install --no-deps "verl==0.9.1"   '
    "(verl's declared dependencies pin transformers < 5.11; --no-deps keeps gradlens's, and "
    "the frameworks extra brings ray, tensordict, omegaconf and codetiming)"
)


@dataclass(frozen=True)
class VerlApi:
    """The pieces of the installed verl that gradlens calls."""

    version: str
    core_algos: Any
    actor_config: Any
    policy_loss_config: Any
    rollout_correction_config: Any
    rollout_correction: Any

    @property
    def registry(self) -> dict[str, Any]:
        return self.core_algos.POLICY_LOSS_REGISTRY  # type: ignore[no-any-return]


@cache
def verl_api(name: str) -> VerlApi:
    """Import the installed verl (7–11 s: ray and tensordict) once per process."""
    version = require(FRAMEWORK, name)
    try:
        import verl.trainer.ppo.core_algos as core_algos
        from verl.trainer.config import RolloutCorrectionConfig
        from verl.trainer.ppo.rollout_corr_helper import (
            compute_rollout_correction_and_rejection_mask,
        )
        from verl.workers.config import ActorConfig, PolicyLossConfig
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: importing verl {version} raised {raised(exc)}. Without its own "
            "dependencies verl needs ray, tensordict, omegaconf and codetiming:\n  "
            f"{INSTALL}"
        ) from None
    return VerlApi(
        version,
        core_algos,
        ActorConfig,
        PolicyLossConfig,
        RolloutCorrectionConfig,
        compute_rollout_correction_and_rejection_mask,
    )


class VerlConfig:
    """Read-only stand-in for verl's actor config: attribute, item and ``get`` access."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return self._values.get(key)

    def __getitem__(self, key: str) -> Any:
        return self._values.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("the verl config passed by gradlens is read-only")

    def get(self, key: str, default: Any = None) -> Any:
        value = self._values.get(key)
        return default if value is None else value

    def __repr__(self) -> str:
        return f"VerlConfig({self._values})"


def verl_aggregation(agg: Aggregation, version: str | None, name: str) -> str:
    """verl's ``loss_agg_mode`` for the run's aggregation, or a clear error."""
    if agg.mode not in VERL_AGGREGATION:
        raise GradlensError(
            f"loss {name!r}: loss.aggregation = {agg.mode} ({AGGREGATIONS[agg.mode].formula}) has "
            "no verl twin (verl ≥ 0.7's seq-mean-token-sum-norm divides by the number of "
            "sequences: seq_mean_token_sum_norm; verl ≤ 0.6 is not supported)"
        )
    mode, since = VERL_AGGREGATION[agg.mode]
    if version is not None and parse_version(version) < since:
        raise GradlensError(
            f"loss {name!r}: loss.aggregation = {agg.mode} is verl's {mode}, which verl "
            f"{version} does not have (it came in {'.'.join(map(str, since))})"
        )
    return mode


def config_values(
    loss_mode: str,
    params: LossParams,
    agg: Aggregation,
    mask: Tensor,
    version: str | None,
    name: str,
) -> dict[str, Any]:
    """The ``loss`` section under verl's ActorConfig names (the table in the module docstring)."""
    low, high = params.eps_low, params.eps_high
    if loss_mode == "cispo":
        low, high = params.cispo_eps_low, params.cispo_eps_high
    clip_c = params.dual_clip if params.dual_clip is not None else math.inf
    if loss_mode in DPPO:
        clip_c = params.cispo_cap
    info: dict[str, Any] = {"dp_size": 1, "loss_scale_factor": agg.loss_scale_factor}
    if agg.count_empty_sequences:  # the trainer's global_batch_size counts every row
        info["global_batch_size"] = float(num_sequences(mask, True))
    return {
        "strategy": "fsdp",  # ActorConfig.__post_init__ insists on these three
        "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 1,
        "clip_ratio": low,
        "clip_ratio_low": low,
        "clip_ratio_high": high,
        "clip_ratio_c": clip_c,
        "loss_agg_mode": verl_aggregation(agg, version, name),
        "loss_scale_factor": agg.loss_scale_factor,
        "tau_pos": params.tau_pos,
        "tau_neg": params.tau_neg,
        "global_batch_info": info,
    }


VERL_REJECTION = frozenset(
    f"{level}_k{k}" for level in ("token", "seq_sum", "seq_mean") for k in "123"
) | {"seq_max_k2", "seq_max_k3"}


def correction_settings(corrections: tuple[Correction, ...], name: str) -> dict[str, Any]:
    """gradlens's corrections as verl's rollout-correction settings, or a clear error."""
    out: dict[str, Any] = {"rollout_is": None, "rollout_is_threshold": 2.0}
    out.update(rollout_rs=None, rollout_rs_threshold=None, rollout_is_batch_normalize=False)
    options: list[tuple[str, str]] = []  # verl's rollout_rs chain: (option, threshold)
    for c in corrections:
        level = "sequence" if c.kind.startswith("seq_") else "token"
        if c.kind == "geo_mask":
            low = c.low if c.low is not None else 0.0
            high = c.high if c.high is not None else math.inf
            # verl keeps −mean log ρ ∈ [log lo, log hi]: ρ̄ ∈ [1/hi, 1/lo] (trap A8)
            options.append(("seq_mean_k1", f"{1 / high!r}_{1 / low if low > 0 else math.inf!r}"))
            continue
        if c.kind in VERL_REJECTION:  # verl's own option under its own name
            assert c.high is not None  # the config requires it
            spec = f"{c.low!r}_{c.high!r}" if c.kind.endswith("k1") and c.low else repr(c.high)
            options.append((c.kind, spec))
            continue
        if c.kind not in ("token_tis", "seq_tis", "token_mis", "icepop", "seq_mis"):
            raise GradlensError(
                f"loss {name!r}: verl has no rollout correction like {c.kind} "
                f"({KINDS[c.kind].formula})"
            )
        if out["rollout_is"] is not None:
            raise GradlensError(
                f"loss {name!r}: verl applies one importance weight (rollout_is); "
                f"loss.corrections has two ({', '.join(c.kind for c in corrections)})"
            )
        out["rollout_is_batch_normalize"] = c.batch_normalize
        if c.kind in ("token_tis", "seq_tis"):
            if c.low not in (None, 0.0) or c.high is None:
                raise GradlensError(
                    f"loss {name!r}: verl's truncated IS clamps from above only: give "
                    f"{c.kind} a high and no low"
                )
            out["rollout_is"], out["rollout_is_threshold"] = level, c.high
        else:  # token_mis, icepop, seq_mis: verl's IcePop band "low_high"
            if not c.low or c.high is None:
                raise GradlensError(
                    f"loss {name!r}: verl masks outside a band 'low_high' with low > 0: give "
                    f"{c.kind} both bounds"
                )
            out["rollout_is"], out["rollout_is_threshold"] = level, f"{c.low!r}_{c.high!r}"
    if options:
        if len({o for o, _ in options}) != len(options):
            raise GradlensError(f"loss {name!r}: verl takes each rejection option once")
        out["rollout_rs"] = ",".join(o for o, _ in options)
        out["rollout_rs_threshold"] = ",".join(t for _, t in options)
    return out


def registered_call(api: VerlApi, loss_mode: str, with_kl: bool, name: str) -> Call:
    """Call ``POLICY_LOSS_REGISTRY[loss_mode]`` (plus verl's KL loss) as verl's trainer does."""
    fn = api.registry[loss_mode]

    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, agg: Aggregation
    ) -> tuple[Tensor, dict[str, float]]:
        mask, old = inputs.mask, inputs.old_logp
        weights, metrics = None, dict[str, Any]()
        if loss_mode == "bypass_mode":  # the trainer passes the rollout log-probs as old
            old = inputs.rollout_logp if inputs.rollout_logp is not None else old
        if params.corrections:
            if loss_mode == "bypass_mode":
                raise GradlensError(
                    f"loss {name!r}: bypass_mode computes its own correction against π_θ; "
                    "run it without loss.corrections"
                )
            weights, mask, metrics = rollout_correction(api, inputs, params.corrections, name)
        values = config_values(loss_mode, params, agg, mask, api.version, name)
        policy_loss: dict[str, Any] = {"loss_mode": loss_mode, "dro_beta": params.kl_coef}
        if loss_mode == "bypass_mode":
            policy_loss["rollout_correction"] = api.rollout_correction_config(
                bypass_mode=True, loss_type="ppo_clip", rollout_is=None, rollout_rs=None
            )
        config = build_actor_config(api, values, policy_loss, name)
        try:
            pg_loss, pg_metrics = fn(
                old_log_prob=old,
                log_prob=logp,
                advantages=inputs.advantages,
                response_mask=mask,
                loss_agg_mode=config.loss_agg_mode,
                config=config,
                rollout_is_weights=weights,
            )
            total = pg_loss
            if with_kl:
                kl_loss = kl_term(api, logp, inputs, params, mask, config, name)
                total = pg_loss + params.kl_coef * kl_loss
                pg_metrics = {**pg_metrics, "actor/kl_loss": kl_loss.detach()}
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(f"loss {name!r}: verl raised {raised(exc)}") from None
        reported = reported_metrics(pg_metrics.items())
        reported.update(reported_metrics(metrics.items()))
        return scalar_loss(total, name, tuple(logp.shape)), reported

    return call


def build_actor_config(
    api: VerlApi, values: dict[str, Any], policy_loss: dict[str, Any], name: str
) -> Any:
    """verl's frozen ActorConfig with the fields this verl has (0.7–0.9 differ a little)."""
    fields = api.actor_config.__dataclass_fields__
    pl_fields = api.policy_loss_config.__dataclass_fields__
    kwargs = {k: v for k, v in values.items() if k in fields}
    kwargs["policy_loss"] = api.policy_loss_config(
        **{k: v for k, v in policy_loss.items() if k in pl_fields}
    )
    try:
        return api.actor_config(**kwargs)
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: verl {api.version} refused the config gradlens built from the "
            f"loss section: {raised(exc)}"
        ) from None


def kl_term(
    api: VerlApi,
    logp: Tensor,
    inputs: TokenInputs,
    params: LossParams,
    mask: Tensor,
    config: Any,
    name: str,
) -> Tensor:
    """verl's KL loss, as ``ppo_loss`` adds it (before the coefficient)."""
    if params.kl_estimator not in VERL_KL:
        raise GradlensError(
            f"loss {name!r}: verl has no KL estimator like loss.kl_estimator = "
            f"{params.kl_estimator}; it has k1, k2 and low_var_kl (gradlens k3)"
        )
    ref = inputs.ref_logp if inputs.ref_logp is not None else inputs.old_logp
    kld = api.core_algos.kl_penalty(
        logprob=logp, ref_logprob=ref, kl_penalty=VERL_KL[params.kl_estimator]
    )
    return api.core_algos.agg_loss(  # type: ignore[no-any-return]
        loss_mat=kld,
        loss_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        **config.global_batch_info,
    )


def rollout_correction(
    api: VerlApi, inputs: TokenInputs, corrections: tuple[Correction, ...], name: str
) -> tuple[Tensor | None, Tensor, dict[str, Any]]:
    """verl's IS weights, its rejection mask and its metrics, from verl's own helper."""
    if inputs.rollout_logp is None:
        raise GradlensError(
            f"loss {name!r}: loss.corrections need the rollout log-probs μ_old, and this batch "
            "has none: set source.rollout_drift (synthetic) or rollout_prob / rollout_logp"
        )
    settings = correction_settings(corrections, name)
    mask = inputs.mask
    try:
        proto, kept, metrics = api.rollout_correction(
            old_log_prob=inputs.old_logp,
            rollout_log_prob=inputs.rollout_logp,
            response_mask=mask.to(inputs.old_logp.dtype),
            **settings,
        )
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: verl's rollout correction raised {raised(exc)}"
        ) from None
    weights = proto.batch["rollout_is_weights"] if proto is not None else None
    return weights, kept.to(torch.bool) & mask, metrics


def shaped_call(fn: Any, name: str) -> Call:
    """Call a verl-shaped function with verl's real config when a supported verl is installed,
    else with the `VerlConfig` stand-in."""
    version = installed_version(FRAMEWORK.distribution)
    use_verl = (
        version is not None
        and is_supported(FRAMEWORK, version)
        and importlib.util.find_spec("verl") is not None
    )
    api = verl_api(name) if use_verl else None

    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, agg: Aggregation
    ) -> tuple[Tensor, dict[str, float]]:
        values = config_values("", params, agg, inputs.mask, version if use_verl else None, name)
        config: Any
        if api is not None:
            config = build_actor_config(api, values, {"loss_mode": "vanilla"}, name)
        else:
            config = VerlConfig(values)
        try:
            result = fn(
                inputs.old_logp,
                logp,
                inputs.advantages,
                inputs.mask.to(logp.dtype),
                loss_agg_mode=values["loss_agg_mode"],
                config=config,
            )
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(
                f"loss {name!r} raised {raised(exc)} (gradlens calls it as "
                "fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=..., "
                "config=...))"
            ) from None
        if isinstance(result, tuple | list):
            if not result:
                raise GradlensError(f"loss {name!r} returned an empty {type(result).__name__}")
            value, rest = result[0], tuple(result[1:])
            if len(rest) == 1 and isinstance(rest[0], dict):
                reported = reported_metrics(rest[0].items())
            else:
                names = POSITIONAL_METRICS + tuple(f"metric_{i}" for i in range(3, len(rest)))
                reported = reported_metrics(zip(names, rest, strict=False))
        else:
            value, reported = result, {}
        return scalar_loss(value, name, tuple(logp.shape)), reported

    return call


def resolve(name: str, rest: str) -> LossSpec:
    """The `LossSpec` of ``verl:<loss_mode>[+kl]`` or ``verl:module:function``."""
    if ":" in rest:
        fn = load_callable(rest, "verl-shaped loss")
        return LossSpec(
            name=name,
            fn=None,
            aggregating_fn=autograd_terms(shaped_call(fn, name), name),
            formula=f"verl policy loss {rest} (aggregates itself with loss_agg_mode)",
            grad_formula="∂L/∂ℓ_t by autograd on log_prob (exact)",
            zero_when="where the function's gradient in ℓ_t is 0",
            paper="user-supplied, verl policy-loss signature",
            post_formula="|c|·(1 − π_y)",
        )
    loss_mode, with_kl = split_kl(rest)
    api = verl_api(name)
    if loss_mode not in api.registry:
        valid = sorted(api.registry)
        raise GradlensError(unknown_framework_loss(FRAMEWORK, name, loss_mode, valid))
    fn = api.registry[loss_mode]
    needs: tuple[str, ...] = ("ref_logp",) if with_kl else ()
    if loss_mode == "bypass_mode":
        needs += ("rollout_logp",)
    kl = " + kl_loss_coef·agg_loss(kl_penalty(·, {k1, k2, low_var_kl}))" if with_kl else ""
    return LossSpec(
        name=name,
        fn=None,
        aggregating_fn=autograd_terms(registered_call(api, loss_mode, with_kl, name), name),
        formula=f"verl {api.version} {getattr(fn, '__name__', loss_mode)}{kl}, ActorConfig "
        "from loss.* (losses.md §9)",
        grad_formula="∂L/∂ℓ_t by autograd through verl's own code (exact)",
        zero_when="where verl's gradient in ℓ_t is 0",
        paper=f"verl {api.version}, core_algos.POLICY_LOSS_REGISTRY[{loss_mode!r}]",
        post_formula="|c|·(1 − π_y)",
        needs=needs,
        handles_corrections=loss_mode != "bypass_mode",
    )


FRAMEWORK = Framework(
    prefix="verl",
    distribution="verl",
    supported=((0, 7), (0, 10)),
    tested="0.9.1",
    install=INSTALL,
    names=NAMES,
    resolve=resolve,
)
