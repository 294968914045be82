"""Diagnose a function written to verl's policy-loss signature, as it is.

``--losses verl:mypkg.losses:compute_policy_loss_x`` (or ``verl:path/to/file.py:fn``) calls

    fn(old_log_prob, log_prob, advantages, response_mask,
       loss_agg_mode=<verl spelling of loss.aggregation>, config=<VerlConfig>)

the signature of verl's ``@register_policy_loss`` functions (``core_algos.py``), and takes the
first element of what it returns: ``(pg_loss, metrics_dict)`` in current verl,
``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` in older verl, or a bare tensor. The other
elements are reported under the loss's ``metrics`` with the prefix ``reported:``, so the
function's own ``pg_clipfrac`` sits beside gradlens's ``clipping.region``.

``config`` is a small read-only object with verl's attribute names, filled from gradlens's
``loss`` section; it answers ``config.x``, ``config["x"]`` and ``config.get("x", default)``:

    verl attribute     from                    note
    clip_ratio         loss.eps_low            verl's symmetric default; both bounds are set
    clip_ratio_low     loss.eps_low
    clip_ratio_high    loss.eps_high
    clip_ratio_c       loss.dual_clip          inf when null: verl always applies dual clip
                                               (it requires c > 1), inf switches it off
    tau_pos, tau_neg   loss.tau_pos, tau_neg   SAPO
    loss_agg_mode      loss.aggregation        verl spelling, e.g. token-mean
    loss_scale_factor  loss.loss_scale_factor

Any other attribute reads as None (``get`` returns its default), as an unset key of verl's
config would. A function that insists on ``isinstance(config, ActorConfig)`` cannot be called
outside verl; wrap it.

Aggregation: the verl function aggregates itself (``agg_loss``), so gradlens does not
aggregate again. gradlens passes ``loss_agg_mode`` = the verl spelling of ``loss.aggregation``
so that the function aggregates as the run is configured; a function that ignores the argument
(verl's GSPO and SAPO force ``seq-mean-token-mean``, trap A7) aggregates its own way, and a
parity check against the built-in loss shows it. ``rollout_is_weights`` is not passed (None).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.user import Call, autograd_terms, load_callable, scalar_loss

VERL_AGGREGATION = {
    "token_mean": "token-mean",
    "seq_mean_token_mean": "seq-mean-token-mean",
    "seq_mean_token_sum": "seq-mean-token-sum",
    "seq_mean_token_sum_norm": "seq-mean-token-sum-norm",
}
# Older verl returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).
POSITIONAL_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


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


def verl_config(params: LossParams) -> VerlConfig:
    """gradlens's loss settings under verl's attribute names."""
    return VerlConfig(
        {
            "clip_ratio": params.eps_low,
            "clip_ratio_low": params.eps_low,
            "clip_ratio_high": params.eps_high,
            "clip_ratio_c": params.dual_clip if params.dual_clip is not None else math.inf,
            "tau_pos": params.tau_pos,
            "tau_neg": params.tau_neg,
            "loss_agg_mode": VERL_AGGREGATION.get(params.aggregation, params.aggregation),
            "loss_scale_factor": params.loss_scale_factor,
        }
    )


def _metrics(rest: tuple[Any, ...]) -> dict[str, float]:
    """The metrics a verl function returned after its loss, as plain floats."""
    items: list[tuple[str, Any]] = []
    if len(rest) == 1 and isinstance(rest[0], dict):
        items = list(rest[0].items())
    else:
        names = POSITIONAL_METRICS + tuple(f"metric_{i}" for i in range(3, len(rest)))
        items = list(zip(names, rest, strict=False))
    out = {}
    for key, value in items:
        try:
            out[f"reported:{key}"] = float(value.detach() if isinstance(value, Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            continue  # a non-numeric metric (a list, a histogram) is not reported
    return out


def verl_call(fn: Any, name: str) -> Call:
    """Call a verl-shaped function; returns its loss and its reported metrics."""

    def call(logp: Tensor, inputs: TokenInputs, params: LossParams) -> tuple[Tensor, dict]:
        config = verl_config(params)
        try:
            result = fn(
                inputs.old_logp,
                logp,
                inputs.advantages,
                inputs.mask.to(logp.dtype),
                loss_agg_mode=config.loss_agg_mode,
                config=config,
            )
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(
                f"loss {name!r} raised {type(exc).__name__}: {exc} (gradlens calls it as "
                "fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=..., "
                "config=...))"
            ) from None
        if isinstance(result, tuple | list):
            if not result:
                raise GradlensError(f"loss {name!r} returned an empty {type(result).__name__}")
            value, reported = result[0], _metrics(tuple(result[1:]))
        else:
            value, reported = result, {}
        return scalar_loss(value, name, tuple(logp.shape)), reported

    return call


def verl_loss_spec(name: str) -> LossSpec:
    """The `LossSpec` of ``verl:module:function``."""
    reference = name.removeprefix("verl:")
    fn = load_callable(reference, "verl-shaped loss")
    return LossSpec(
        name=name,
        fn=autograd_terms(verl_call(fn, name), name),
        formula=f"verl policy loss {reference} (aggregates itself with loss_agg_mode)",
        coefficient="∂L/∂ℓ_t by autograd on log_prob (exact)",
        zero_when="where the function's gradient in ℓ_t is 0",
        paper="user-supplied, verl policy-loss signature",
        post_formula="|c|·(1 − π_y)",
    )
