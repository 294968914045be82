"""What every framework adapter shares: its description, the version check, the ``+kl`` suffix.

A `Framework` names the pip distribution, the versions gradlens supports (those whose loss code
was read and whose call route is the one used here) and the one CI tests, how to install it,
and the loss names it offers. `require` is the one place that says "not installed" or "this
version is not supported", with the install line, before anything imports the framework.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass

from gradlens.errors import GradlensError
from gradlens.losses.base import LossSpec

Version = tuple[int, ...]
KL_SUFFIX = "+kl"  # ``trl:grpo+kl``: the framework's KL penalty added, β = loss.kl_coef


@dataclass(frozen=True)
class Framework:
    """One framework whose real loss code gradlens calls.

    Attributes:
        prefix: the name prefix, ``verl`` in ``verl:vanilla``.
        distribution: the pip distribution that must be installed.
        supported: [lowest, first unsupported) versions, as integer tuples.
        tested: the version CI runs against (the ``frameworks`` extra pins it).
        install: the commands that install it next to gradlens.
        names: the loss names it offers, for ``gradlens losses`` and the docs (resolution
            checks the installed framework itself).
        resolve: (full name, the part after the prefix) → the loss's `LossSpec`.
    """

    prefix: str
    distribution: str
    supported: tuple[Version, Version]
    tested: str
    install: str
    names: tuple[str, ...]
    resolve: Callable[[str, str], LossSpec]

    @property
    def supported_text(self) -> str:
        low, high = (".".join(map(str, v)) for v in self.supported)
        return f"{self.distribution} >= {low}, < {high}"


def parse_version(text: str) -> Version:
    """``"0.9.1"`` → (0, 9, 1); a suffix such as ``.dev0`` or ``rc1`` is ignored."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def installed_version(distribution: str) -> str | None:
    """The installed version of a pip distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_supported(framework: Framework, version: str) -> bool:
    low, high = framework.supported
    return low <= parse_version(version) < high


def require(framework: Framework, name: str) -> str:
    """The installed version of ``framework``; a clear error when it is missing or unsupported."""
    version = installed_version(framework.distribution)
    if version is None:
        raise GradlensError(
            f"loss {name!r} calls {framework.distribution}'s own code, and "
            f"{framework.distribution} is not installed. Install it next to gradlens:\n"
            f"  {framework.install}"
        )
    if not is_supported(framework, version):
        raise GradlensError(
            f"loss {name!r}: {framework.distribution} {version} is installed; gradlens calls "
            f"the loss code of {framework.supported_text} (tested: {framework.tested}), whose "
            "signatures and defaults it knows. Install a supported version:\n"
            f"  {framework.install}"
        )
    return version


def split_kl(rest: str) -> tuple[str, bool]:
    """``"grpo+kl"`` → ("grpo", True): the loss name and whether the KL penalty is added."""
    if rest.endswith(KL_SUFFIX):
        return rest[: -len(KL_SUFFIX)], True
    return rest, False


def unknown_framework_loss(framework: Framework, name: str, rest: str, valid: list[str]) -> str:
    """The message for a loss name the installed framework does not have."""
    return (
        f"loss {name!r}: {framework.distribution} has no loss {rest!r}; it has "
        f"{', '.join(valid)} (each also with {KL_SUFFIX})"
    )
