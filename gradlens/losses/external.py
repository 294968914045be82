"""External losses: the user's own function, and the machinery framework losses share with it.

The registry (`gradlens.losses.registry.get_loss`) resolves every name with a ':' that is not a
framework's (`gradlens.losses.frameworks`) here: ``module:function`` or
``path/to/file.py:function`` is a user loss. It aggregates itself, so its `LossSpec` has an
``aggregating_fn`` that receives the run's `Aggregation`, and it gets an exact c_t by autograd
(`autograd_terms`, which the framework losses use too).

User losses
-----------

The function is called on the per-token tensors of the batch, [N, T] each:

    my_loss(logp, old_logp, advantages, mask, *, rollout_logp=None, ref_logp=None,
            aggregation="token_mean", settings=None)
        -> loss                      a 0-d tensor, the loss that is minimised
        -> (loss, metrics)           ... and a dict of numbers it reports about itself

    logp          log π_θ(y_t)       differentiable: the only path from the loss to the logits
    old_logp      log π_old(y_t)     constant
    advantages    A_t                constant
    mask          1.0 at valid tokens, 0.0 at padding (float, like verl's response_mask)
    rollout_logp  log μ_old(y_t) from the inference engine, or None when the source has none
    ref_logp      log π_ref(y_t) of the reference policy, or None
    aggregation   gradlens's ``loss.aggregation`` (token_mean, seq_mean_token_mean, ...)
    settings      the resolved ``loss`` section (`LossSettings`): settings.eps_low,
                  settings.kl_coef, settings.aggregation, settings.corrections, ...

The keyword arguments are passed only when the function declares them (or ``**kwargs``), so
``def my_loss(logp, old_logp, advantages, mask)`` is enough. Every tensor is 0 at padded
positions. The function aggregates itself: gradlens's aggregation weights do not apply, the
report's a_t is 1 and c_t is the function's own ∂L/∂ℓ_t. The metrics it returns are reported
under ``metrics["reported:<name>"]`` (numbers only; anything else is left out).

How the diagnostics stay exact. The loss reaches the logits only through ``logp``, so the
master identity ∂L/∂z_t = c_t·(e_y − π_t) holds with c_t = ∂L/∂ℓ_t, which gradlens takes by
autograd on a fresh leaf copy of the [N, T] ``logp``: exact, whatever the function computes
(sequence ratios, sorting, clamps...). The autograd twin differentiates the same function
through log_softmax(W h), so the agreement check tests the whole chain. The function is called
twice (once per path) with the same CPU random stream (seed 0), so a function that draws random
numbers (verl's ``clip_cov``) makes the same draws on both.

Resolution errors (module not found, no such attribute, not callable) and call errors (the
function raised, returned something other than a scalar tensor, or a value that does not
depend on ``logp``) are `GradlensError` messages naming the loss; an exception raised inside
the function names the file, line and source of the innermost frame outside torch and
gradlens, so a bare ``assert`` says which assertion failed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    "aggregation='token_mean', settings=None) -> loss or (loss, metrics)"
)
OPTIONAL_ARGS = ("rollout_logp", "ref_logp", "aggregation", "settings")
RANDOM_SEED = 0  # every call of an external loss sees the same CPU random stream

# A call on one [N, T] log-prob tensor: (the scalar loss, the metrics the function reported).
Call = Callable[[Tensor, TokenInputs, LossParams, Aggregation], tuple[Tensor, dict[str, float]]]

_SPECS: dict[str, LossSpec] = {}
_SKIP_FRAMES = (
    str(Path(torch.__file__).resolve().parent),
    str(Path(__file__).resolve().parents[1]),  # gradlens itself
)


@dataclass(frozen=True)
class LossSettings:
    """The resolved ``loss`` section as a user loss receives it (keyword ``settings``).

    Every key of the section reads as an attribute with its YAML name (``settings.eps_low``,
    ``settings.aggregation``, ``settings.loss_scale_factor``, ``settings.corrections`` as
    `Correction` objects ...); ``as_dict()`` gives them all.
    """

    params: LossParams
    agg: Aggregation

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self.params, name) for name in self.params.__dataclass_fields__}
        out["aggregation"] = self.agg.mode
        out["loss_scale_factor"] = self.agg.loss_scale_factor
        out["count_empty_sequences"] = self.agg.count_empty_sequences
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        values = self.as_dict()
        if name not in values:
            raise AttributeError(
                f"the loss section has no setting {name!r}; it has {', '.join(sorted(values))}"
            )
        return values[name]


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
            problem = (
                f"{str(path)!r} is not a regular file"
                if path.exists()
                else f"no such file {str(path)!r}"
            )
            raise GradlensError(f"{what} {reference!r}: {problem}")
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
                f"{what} {reference!r}: running {str(path)!r} raised {raised(exc)}"
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
            f"{what} {reference!r}: importing {target!r} raised {raised(exc)}"
        ) from None


def raised(exc: BaseException) -> str:
    """``exc`` in words: its type, its message, and where it was raised, with the source line.

    The place is the innermost frame outside torch and gradlens (the user's or the framework's
    own code), so an ``assert`` without a message still says which assertion failed.
    """
    text = type(exc).__name__
    if str(exc):
        text += f": {exc}"
    trace = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in trace if not f.filename.startswith(_SKIP_FRAMES)]
    if frames:
        where = frames[-1]
        text += f" (at {where.filename}:{where.lineno}"
        text += f": {where.line.strip()})" if where.line else ")"
    return text


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
            "torch.Tensor, the loss to minimise, or (loss, metrics)"
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


def reported_metrics(items: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """Metrics a function returned, as ``reported:<name>`` floats; non-numbers are left out."""
    out = {}
    for key, value in items:
        try:
            out[f"reported:{key}"] = float(value.detach() if isinstance(value, Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            continue  # a non-numeric metric (a list, a histogram) is not reported
    return out


def autograd_terms(call: Call, name: str) -> SelfAggregatingFn:
    """A loss function whose per-token gradient is the exact ∂L/∂ℓ_t of ``call``, by autograd."""

    def seeded(
        logp: Tensor, inputs: TokenInputs, params: LossParams, aggregation: Aggregation
    ) -> tuple[Tensor, dict[str, float]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return call(logp, inputs, params, aggregation)

    def loss_fn(inputs: TokenInputs, params: LossParams, aggregation: Aggregation) -> LossTerms:
        leaf = inputs.logp.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # callers may run losses under no_grad (sweeps)
            value, reported = seeded(leaf, inputs, params, aggregation)
            if not value.requires_grad:
                raise GradlensError(
                    f"loss {name!r} returned a value that does not depend on logp (no "
                    "gradient reaches it): was logp detached, or converted to a number?"
                )
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        m = inputs.mask
        c = torch.zeros_like(leaf) if grad is None else torch.where(m, grad.to(leaf.dtype), 0.0)
        if inputs.logp.requires_grad:  # the autograd twin: differentiate through the caller's ℓ
            value, _ = seeded(inputs.logp, inputs, params, aggregation)
        else:
            value = value.detach()
        value = value.to(leaf.dtype)  # a framework may compute in float32 (OpenRLHF's KL)
        mf = m.to(leaf.dtype)
        per_token = value * mf / mf.sum().clamp(min=1.0)  # Σ per_token = L, gradient intact
        return LossTerms(
            per_token=per_token,
            per_token_grad=c.detach(),
            self_aggregated=True,
            reported=reported,
        )

    return loss_fn


def split_result(result: Any, name: str, shape: tuple[int, ...]) -> tuple[Tensor, dict]:
    """A user function's ``loss`` or ``(loss, metrics)`` as (0-d tensor, reported metrics)."""
    if isinstance(result, tuple | list):
        if len(result) != 2 or not isinstance(result[1], dict):
            raise GradlensError(
                f"loss {name!r} returned a {type(result).__name__} of {len(result)} items; "
                "expected the loss, or (loss, metrics) with metrics a dict of numbers"
            )
        return scalar_loss(result[0], name, shape), reported_metrics(result[1].items())
    return scalar_loss(result, name, shape), {}


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
            "settings": LossSettings(params, aggregation),
        }
        kwargs = {k: v for k, v in optional.items() if k in keywords}
        mask = inputs.mask.to(logp.dtype)
        try:
            result = fn(logp, inputs.old_logp, inputs.advantages, mask, **kwargs)
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(
                f"loss {name!r} raised {raised(exc)} (gradlens calls it as {SIGNATURE})"
            ) from None
        return split_result(result, name, tuple(logp.shape))

    return call


def external_loss_spec(name: str) -> LossSpec:
    """The `LossSpec` of a user loss ``module:function``, resolved once per process and name."""
    if name in _SPECS:
        return _SPECS[name]
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
