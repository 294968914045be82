"""External losses: the user's own function, or one written to verl's policy-loss signature.

The registry (`gradlens.losses.registry.get_loss`) resolves every name with a ':' here:
``module:function`` or ``path/to/file.py:function`` is a user loss, ``verl:module:function`` a
verl-shaped one. Both aggregate themselves, so their `LossSpec` has an ``aggregating_fn`` that
receives the run's `Aggregation`, and both get an exact c_t by autograd (below).

User losses
-----------

The function is called on the per-token tensors of the batch, [N, T] each:

    my_loss(logp, old_logp, advantages, mask, *, rollout_logp=None, ref_logp=None,
            aggregation="token_mean") -> 0-d tensor, the loss that is minimised

    logp          log π_θ(y_t)       differentiable: the only path from the loss to the logits
    old_logp      log π_old(y_t)     constant
    advantages    A_t                constant
    mask          1.0 at valid tokens, 0.0 at padding (float, like verl's response_mask)
    rollout_logp  log μ_old(y_t) from the inference engine, or None when the source has none
    ref_logp      log π_ref(y_t) of the reference policy, or None
    aggregation   gradlens's ``loss.aggregation`` (token_mean, seq_mean_token_mean, ...)

The keyword arguments are passed only when the function declares them (or ``**kwargs``), so
``def my_loss(logp, old_logp, advantages, mask)`` is enough. Every tensor is 0 at padded
positions. The function aggregates itself: gradlens's aggregation weights do not apply, the
report's a_t is 1 and c_t is the function's own ∂L/∂ℓ_t.

How the diagnostics stay exact. The loss reaches the logits only through ``logp``, so the
master identity ∂L/∂z_t = c_t·(e_y − π_t) holds with c_t = ∂L/∂ℓ_t, which gradlens takes by
autograd on a fresh leaf copy of the [N, T] ``logp``: exact, whatever the function computes
(sequence ratios, sorting, clamps...). The autograd twin differentiates the same function
through log_softmax(W h), so the agreement check tests the whole chain.

Resolution errors (module not found, no such attribute, not callable) and call errors (the
function raised, returned something other than a scalar tensor, or a value that does not
depend on ``logp``) are `GradlensError` messages naming the loss.


verl-shaped losses
------------------

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

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.aggregation import Aggregation
from gradlens.losses.base import LossParams, LossSpec, SelfAggregatingFn

SIGNATURE = (
    "fn(logp, old_logp, advantages, mask, *, rollout_logp=None, ref_logp=None, "
    "aggregation='token_mean') -> 0-d tensor"
)
OPTIONAL_ARGS = ("rollout_logp", "ref_logp", "aggregation")

# A call on one [N, T] log-prob tensor: (the scalar loss, the metrics the function reported).
Call = Callable[[Tensor, TokenInputs, LossParams, Aggregation], tuple[Tensor, dict[str, float]]]

_SPECS: dict[str, LossSpec] = {}


def is_external(name: str) -> bool:
    """External losses are named ``module:function`` (registry names never contain ':')."""
    return ":" in name


def load_callable(reference: str, what: str) -> Callable[..., Any]:
    """The function named by ``module.path:function`` or ``path/to/file.py:function``."""
    target, sep, attr = reference.rpartition(":")
    if not sep or not target or not attr:
        raise GradlensError(
            f"{what} {reference!r}: expected module:function or path/to/file.py:function"
        )
    module = _load_module(target, reference, what)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise GradlensError(
                f"{what} {reference!r}: {target!r} has no attribute {attr!r} "
                f"(it defines: {', '.join(public) or 'nothing public'})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise GradlensError(
            f"{what} {reference!r}: {attr!r} is a {type(obj).__name__}, not a function"
        )
    return obj  # type: ignore[no-any-return]


def _load_module(target: str, reference: str, what: str) -> Any:
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise GradlensError(f"{what} {reference!r}: no such file {str(path)!r}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        name = f"gradlens_user_{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise GradlensError(f"{what} {reference!r}: cannot load {str(path)!r} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise GradlensError(
                f"{what} {reference!r}: running {str(path)!r} raised {type(exc).__name__}: {exc}"
            ) from None
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise GradlensError(
            f"{what} {reference!r}: module {target!r} not found ({exc}); is it installed or "
            "on PYTHONPATH? A file can be named as path/to/file.py:function"
        ) from None
    except Exception as exc:
        raise GradlensError(
            f"{what} {reference!r}: importing {target!r} raised {type(exc).__name__}: {exc}"
        ) from None


def accepted_keywords(fn: Callable[..., Any], names: tuple[str, ...]) -> set[str]:
    """Which of ``names`` the function can take as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


def scalar_loss(value: Any, name: str, shape: tuple[int, ...]) -> Tensor:
    """The function's return value as a 0-d tensor, or a clear error."""
    if not isinstance(value, Tensor):
        raise GradlensError(
            f"loss {name!r} returned {type(value).__name__}; expected a scalar (0-d) "
            "torch.Tensor, the loss to minimise"
        )
    if value.numel() != 1:
        hint = (
            ": these look like per-token losses; aggregate them, e.g. "
            "(loss * mask).sum() / mask.sum()"
            if tuple(value.shape) == shape
            else ""
        )
        raise GradlensError(
            f"loss {name!r} returned a tensor of shape {list(value.shape)}; expected a scalar "
            f"(0-d) tensor{hint}"
        )
    if not value.is_floating_point():
        raise GradlensError(f"loss {name!r} returned a {value.dtype} tensor; expected a float")
    return value.reshape(())


def autograd_terms(call: Call, name: str) -> SelfAggregatingFn:
    """A loss function whose per-token gradient is the exact ∂L/∂ℓ_t of ``call``, by autograd."""

    def loss_fn(inputs: TokenInputs, params: LossParams, aggregation: Aggregation) -> LossTerms:
        leaf = inputs.logp.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # callers may run losses under no_grad (sweeps)
            value, reported = call(leaf, inputs, params, aggregation)
            if not value.requires_grad:
                raise GradlensError(
                    f"loss {name!r} returned a value that does not depend on logp (no "
                    "gradient reaches it): was logp detached, or converted to a number?"
                )
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        m = inputs.mask
        c = torch.zeros_like(leaf) if grad is None else torch.where(m, grad, 0.0)
        if inputs.logp.requires_grad:  # the autograd twin: differentiate through the caller's ℓ
            value, _ = call(inputs.logp, inputs, params, aggregation)
        else:
            value = value.detach()
        mf = m.to(leaf.dtype)
        per_token = value * mf / mf.sum().clamp(min=1.0)  # Σ per_token = L, gradient intact
        return LossTerms(
            per_token=per_token,
            per_token_grad=c.detach(),
            self_aggregated=True,
            reported=reported,
        )

    return loss_fn


def user_call(fn: Callable[..., Any], name: str) -> Call:
    """Call a function written to gradlens's documented signature."""
    keywords = accepted_keywords(fn, OPTIONAL_ARGS)

    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, aggregation: Aggregation
    ) -> tuple[Tensor, dict]:
        optional = {
            "rollout_logp": inputs.rollout_logp,
            "ref_logp": inputs.ref_logp,
            "aggregation": aggregation.mode,
        }
        kwargs = {k: v for k, v in optional.items() if k in keywords}
        mask = inputs.mask.to(logp.dtype)
        try:
            value = fn(logp, inputs.old_logp, inputs.advantages, mask, **kwargs)
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(
                f"loss {name!r} raised {type(exc).__name__}: {exc} (gradlens calls it as "
                f"{SIGNATURE})"
            ) from None
        return scalar_loss(value, name, tuple(logp.shape)), {}

    return call


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


def verl_config(params: LossParams, aggregation: Aggregation) -> VerlConfig:
    """gradlens's loss settings under verl's attribute names."""
    return VerlConfig(
        {
            "clip_ratio": params.eps_low,
            "clip_ratio_low": params.eps_low,
            "clip_ratio_high": params.eps_high,
            "clip_ratio_c": params.dual_clip if params.dual_clip is not None else math.inf,
            "tau_pos": params.tau_pos,
            "tau_neg": params.tau_neg,
            "loss_agg_mode": VERL_AGGREGATION.get(aggregation.mode, aggregation.mode),
            "loss_scale_factor": aggregation.loss_scale_factor,
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

    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, aggregation: Aggregation
    ) -> tuple[Tensor, dict]:
        config = verl_config(params, aggregation)
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
        fn=None,
        aggregating_fn=autograd_terms(verl_call(fn, name), name),
        formula=f"verl policy loss {reference} (aggregates itself with loss_agg_mode)",
        grad_formula="∂L/∂ℓ_t by autograd on log_prob (exact)",
        zero_when="where the function's gradient in ℓ_t is 0",
        paper="user-supplied, verl policy-loss signature",
        post_formula="|c|·(1 − π_y)",
    )


def external_loss_spec(name: str) -> LossSpec:
    """The `LossSpec` of a user or verl-shaped loss, resolved once per process and name."""
    if name in _SPECS:
        return _SPECS[name]
    if name.startswith("verl:"):
        spec = verl_loss_spec(name)
    else:
        fn = load_callable(name, "user loss")
        spec = LossSpec(
            name=name,
            fn=None,
            aggregating_fn=autograd_terms(user_call(fn, name), name),
            formula=f"user function {name} (aggregates itself)",
            grad_formula="∂L/∂ℓ_t by autograd on log π_θ(y) (exact)",
            zero_when="where the function's gradient in ℓ_t is 0",
            paper="user-supplied",
            post_formula="|c|·(1 − π_y)",
        )
    _SPECS[name] = spec
    return spec
