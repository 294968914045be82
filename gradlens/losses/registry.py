"""The loss registry: adding a loss is one module and one ``register`` call.

Lookups of an unknown name raise a `GradlensError` that lists the valid names and suggests the
closest one, so no caller ever branches on a loss-name string.
"""

from __future__ import annotations

from gradlens.errors import GradlensError, unknown_name_message
from gradlens.losses.base import LossSpec
from gradlens.losses.external import external_loss_spec, is_external
from gradlens.losses.frameworks import framework_loss_spec, framework_of

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


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name``; ``verl:...``, ``trl:...``, ``openrlhf:...`` name a
    framework's own loss, any other ``module:function`` a user loss."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if framework_of(name) is not None:  # the framework's real code, resolved for the process
            return framework_loss_spec(name)
        if is_external(name):  # a user function, resolved for this process
            return external_loss_spec(name)
        raise GradlensError(unknown_name_message("loss", name, loss_names())) from None
