"""The user's own loss: ``--losses mypkg.losses:my_loss`` or ``path/to/file.py:my_loss``.

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

verl-shaped functions go through `gradlens.losses.verl_adapter` (``verl:module:function``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import LossParams, LossSpec

SIGNATURE = (
    "fn(logp, old_logp, advantages, mask, *, rollout_logp=None, ref_logp=None, "
    "aggregation='token_mean') -> 0-d tensor"
)
OPTIONAL_ARGS = ("rollout_logp", "ref_logp", "aggregation")

# A call on one [N, T] log-prob tensor: (the scalar loss, the metrics the function reported).
Call = Callable[[Tensor, TokenInputs, LossParams], tuple[Tensor, dict[str, float]]]

_SPECS: dict[str, LossSpec] = {}


def is_user_loss(name: str) -> bool:
    """User losses are named ``module:function`` (registry names never contain ':')."""
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


def autograd_terms(call: Call, name: str) -> Callable[[TokenInputs, LossParams], LossTerms]:
    """A loss function whose coefficient is the exact ∂L/∂ℓ_t of ``call``, by autograd."""

    def loss_fn(inputs: TokenInputs, params: LossParams) -> LossTerms:
        leaf = inputs.logp.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # callers may run losses under no_grad (sweeps)
            value, reported = call(leaf, inputs, params)
            if not value.requires_grad:
                raise GradlensError(
                    f"loss {name!r} returned a value that does not depend on logp (no "
                    "gradient reaches it): was logp detached, or converted to a number?"
                )
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        m = inputs.mask
        c = torch.zeros_like(leaf) if grad is None else torch.where(m, grad, 0.0)
        if inputs.logp.requires_grad:  # the autograd twin: differentiate through the caller's ℓ
            value, _ = call(inputs.logp, inputs, params)
        else:
            value = value.detach()
        mf = m.to(leaf.dtype)
        per_token = value * mf / mf.sum().clamp(min=1.0)  # Σ per_token = L, gradient intact
        return LossTerms(
            per_token=per_token,
            coefficient=c.detach(),
            self_aggregated=True,
            reported=reported,
        )

    return loss_fn


def user_call(fn: Callable[..., Any], name: str) -> Call:
    """Call a function written to gradlens's documented signature."""
    keywords = accepted_keywords(fn, OPTIONAL_ARGS)

    def call(logp: Tensor, inputs: TokenInputs, params: LossParams) -> tuple[Tensor, dict]:
        optional = {
            "rollout_logp": inputs.rollout_logp,
            "ref_logp": inputs.ref_logp,
            "aggregation": params.aggregation,
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


def user_loss_spec(name: str) -> LossSpec:
    """The `LossSpec` of a user loss, resolved once per process and name."""
    if name in _SPECS:
        return _SPECS[name]
    if name.startswith("verl:"):
        from gradlens.losses.verl_adapter import verl_loss_spec

        spec = verl_loss_spec(name)
    else:
        fn = load_callable(name, "user loss")
        spec = LossSpec(
            name=name,
            fn=autograd_terms(user_call(fn, name), name),
            formula=f"user function {name} (aggregates itself)",
            coefficient="∂L/∂ℓ_t by autograd on log π_θ(y) (exact)",
            zero_when="where the function's gradient in ℓ_t is 0",
            paper="user-supplied",
            post_formula="|c|·(1 − π_y)",
        )
    _SPECS[name] = spec
    return spec
