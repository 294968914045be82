"""Framework losses by name: the real loss code of verl, TRL and OpenRLHF, run by gradlens.

``verl:vanilla``, ``trl:grpo``, ``openrlhf:ppo``, ... each import the installed framework (only
when such a name is asked for), build the framework's own configuration from gradlens's
``loss`` section, pass the reference and rollout log-probs where the function takes them, and
call the framework's function on the [N, T] log-probs; c_t follows by autograd, exactly
(`gradlens.losses.external.autograd_terms`). One module per framework holds its name table,
its supported versions and the mapping of settings (docs/losses.md §9 has them all); this
module is the registry that maps a prefix to its framework.
"""

from __future__ import annotations

from gradlens.errors import GradlensError
from gradlens.losses.base import LossSpec
from gradlens.losses.frameworks import openrlhf, trl, verl
from gradlens.losses.frameworks.base import KL_SUFFIX, Framework, installed_version

FRAMEWORKS: dict[str, Framework] = {
    f.prefix: f for f in (verl.FRAMEWORK, trl.FRAMEWORK, openrlhf.FRAMEWORK)
}
_SPECS: dict[str, LossSpec] = {}


def framework_of(name: str) -> Framework | None:
    """The framework whose prefix ``name`` carries (``verl:...``), or None."""
    prefix, sep, _ = name.partition(":")
    return FRAMEWORKS.get(prefix) if sep else None


def framework_loss_spec(name: str) -> LossSpec:
    """The `LossSpec` of a framework loss, resolved once per process and name."""
    if name in _SPECS:
        return _SPECS[name]
    framework = framework_of(name)
    if framework is None:
        raise GradlensError(f"loss {name!r} names no framework ({', '.join(FRAMEWORKS)})")
    spec = framework.resolve(name, name.partition(":")[2])
    _SPECS[name] = spec
    return spec


def framework_rows() -> list[dict[str, str]]:
    """One row per framework for ``gradlens losses``: names, versions, what is installed."""
    return [
        {
            "framework": f.prefix,
            "names": ", ".join(f"{f.prefix}:{n}" for n in f.names) + f" (each also {KL_SUFFIX})",
            "supported": f.supported_text,
            "tested": f.tested,
            "installed": installed_version(f.distribution) or "not installed",
        }
        for f in FRAMEWORKS.values()
    ]


__all__ = ["FRAMEWORKS", "Framework", "framework_loss_spec", "framework_of", "framework_rows"]
