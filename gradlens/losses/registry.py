"""The loss registry: adding a loss is one module and one ``register`` call.

Lookups of an unknown name raise a `GradlensError` that lists the valid names and suggests the
closest one, so no caller ever branches on a loss-name string.
"""

from __future__ import annotations

import difflib

from gradlens.errors import GradlensError
from gradlens.losses.base import LossSpec

_REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to the registry; a second loss with the same name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"loss {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def loss_names() -> list[str]:
    """Every registered loss name, in registration order."""
    return list(_REGISTRY)


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """'unknown loss 'ppo_clp'; did you mean 'ppo_clip'? valid: ...' — shared by all registries."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})"


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name``; ``module:function`` names a user loss."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if ":" in name:  # a user or verl-shaped function, resolved for this process
            from gradlens.losses.user import user_loss_spec

            return user_loss_spec(name)
        raise GradlensError(unknown_name_message("loss", name, loss_names())) from None
