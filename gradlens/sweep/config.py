"""The configuration of ``gradlens sweep``: YAML + ``--set`` + ``--over`` → a frozen `SweepConfig`.

Precedence, as for ``compare``: command-line flags > ``--set key=value`` > the YAML file >
the defaults written here. ``SweepConfig()`` is the built-in default sweep: π_old(y) from 1e-6
to 1 in 301 log-spaced points (50 per decade, so a clip boundary is located to within 5 %) at
π_θ(y) = 0.5, for reinforce, ppo, ppo_clip and sft, at A = +1 and A = −1. π_θ = 0.5 is chosen
because it sits the REINFORCE gradient |A|(1 − π_θ) mid-way between its limits 0 and |A|, and
puts both clip boundaries (π_old = π_θ/(1 + ε_high) = 0.39 and π_θ/(1 − ε_low) = 0.625) well
inside the range and visibly apart from the on-policy point π_old = π_θ.

The loss settings are the ``loss`` section of `gradlens.config.LossConfig`, so a sweep and a
``compare`` run read the same keys (``loss.eps_high``, ``loss.dual_clip``, ``loss.aggregation``).

``over`` (and ``--over KEY=V1,V2,...``) names further settings to compare on the same axes;
every combination of their values is a *variant*. Keys are validated against this model before
any value is tried; each variant is then validated as a whole config, and every problem is
reported at once with its dotted path (the messages come from `gradlens.config.format_error`).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gradlens.config import (
    LossConfig,
    Strict,
    apply_override,
    format_error,
    load_yaml,
    parse_override,
    read_yaml,
    repeated_value,
    yaml_problem,
)
from gradlens.errors import GradlensError, unknown_name_message
from gradlens.losses import get_loss
from gradlens.sweep.grid import AXES, SWEPT, SYMBOL, range_problems
from gradlens.sweep.support import PointSupport, feasibility_problems

MAX_VARIANTS = 256  # combinations of --over values; each one is a full set of curves
# Group- and batch-coupled losses are called once per point (gradlens.sweep.curves): about a
# millisecond a call, so this many calls per loss and variant is about 20 s.
MAX_COUPLED_CALLS = 20_000


class AxisConfig(Strict):
    """One probability axis: its range when swept, its value when not."""

    min: float = Field(1e-6, gt=0, le=1, description="lowest probability swept, in (0, 1]")
    max: float = Field(1.0, gt=0, le=1, description="highest probability swept, in (0, 1]")
    points: int = Field(301, ge=2, le=100_000, description="number of points, ends included")
    scale: Literal["log", "linear"] = Field("log", description="spacing of the points")
    fixed: float = Field(0.5, gt=0, le=1, description="the value used when not swept")

    @model_validator(mode="after")
    def _usable_range(self) -> AxisConfig:
        problems = range_problems(self.min, self.max, self.points, self.scale)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def spec(self) -> tuple[float, float, int, str]:
        return (self.min, self.max, self.points, self.scale)


class CheckConfig(Strict):
    """The autograd check of a regular subset of the points (see gradlens.sweep.check)."""

    points: int = Field(9, ge=0, le=101, description="evenly spaced points per swept axis; 0: off")
    vocab_size: int = Field(8, ge=2, le=4096, description="V of the explicit distribution")


class SupportConfig(Strict):
    """The rollout's top-p/top-k kept set K_t at every point (gradlens.sweep.support);
    ``loss.sampling_support`` says whether the loss replays it."""

    kept_mass: float = Field(
        1.0, gt=0, le=1, description="S_θ: π_θ's mass of the kept set K_t, in (0, 1]; 1: none"
    )
    old_kept_mass: float | None = Field(
        None, gt=0, le=1, description="S_old: π_old's mass of K_t; null: the same as kept_mass"
    )
    old_logp: Literal["full", "kept"] = Field(
        "full",
        description="the stored ℓ_old: full, log π_old(y) over the whole vocabulary (a training "
        "pass); kept, log π̃_old(y) = log π_old(y) − log S_old (the engine's processed log-probs)",
    )

    def point(self, replayed: bool) -> PointSupport:
        old = self.kept_mass if self.old_kept_mass is None else self.old_kept_mass
        return PointSupport(self.kept_mass, old, self.old_logp, replayed)


class SweepConfig(Strict):
    """A whole sweep. Every field has a default: ``SweepConfig()`` is the built-in sweep."""

    losses: list[str] = Field(
        default_factory=lambda: ["reinforce", "ppo", "ppo_clip", "sft"],
        description="registered loss names",
    )
    vary: Literal["pi_old", "pi_theta", "both"] = Field(
        "pi_old", description="the swept axis: π_old(y), π_θ(y), or both as a 2-D grid"
    )
    pi_old: AxisConfig = AxisConfig()
    pi_theta: AxisConfig = AxisConfig()
    advantage: float = Field(1.0, gt=0, description="|A|; every loss is swept at A = +|A| and −|A|")
    loss: LossConfig = LossConfig()
    over: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="dotted key → values to compare on the same axes (every combination)",
    )
    check: CheckConfig = CheckConfig()
    support: SupportConfig = SupportConfig()

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one loss")
        unknown = []
        for name in value:
            try:
                get_loss(name)  # a registered name, or module:function for a user loss
            except GradlensError as exc:
                unknown.append(str(exc))
        if unknown:
            raise ValueError("; ".join(unknown))
        if len(set(value)) != len(value):
            raise ValueError(f"a loss is named twice: {value}")
        return value

    @field_validator("over")
    @classmethod
    def _sweepable_keys(
        cls, value: dict[str, list[Any]], info: ValidationInfo
    ) -> dict[str, list[Any]]:
        vary = info.data.get("vary")  # validated before ``over``: fields run in order
        problems = []
        for key, values in value.items():
            problem = over_key_problem(key)
            if problem is None and vary in SWEPT and key.removesuffix(".fixed") in SWEPT[vary]:
                problem = (
                    f"{key} is unused because vary = {vary} sweeps that axis; compare fixed "
                    f"values of the other axis instead"
                )
            if problem is not None:
                problems.append(problem)
            elif not values:
                problems.append(f"{key}: the list of values is empty; give at least one")
        if problems:
            raise ValueError("; ".join(problems))
        combinations = math.prod(len(v) for v in value.values())
        if combinations > MAX_VARIANTS:
            raise ValueError(
                f"{combinations} combinations of values, more than {MAX_VARIANTS}; sweep fewer"
            )
        return value

    @model_validator(mode="after")
    def _only_what_is_drawn(self) -> SweepConfig:
        """The settings that act outside the loss functions are not drawn (a point has no
        rollout policy, no batch, no teacher): refused, not silently left out."""
        defaults = LossConfig()
        given = [
            f"loss.{name}"
            for name in NOT_DRAWN_SETTINGS
            if getattr(self.loss, name) != getattr(defaults, name)
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: {NOT_DRAWN}; leave {'it' if len(given) == 1 else 'them'} "
                "out of the sweep (gradlens compare shows the effect on a batch)"
            )
        return self

    @model_validator(mode="after")
    def _coupled_losses_fit(self) -> SweepConfig:
        points = math.prod(self.axis(name).points for name in SWEPT[self.vary])
        problems = []
        for name in self.losses:
            coupling = get_loss(name).coupling
            if coupling not in ("group", "batch"):
                continue
            calls = points * (2 if coupling == "batch" else 1)
            if calls > MAX_COUPLED_CALLS:
                per_axis = int(math.sqrt(MAX_COUPLED_CALLS / 2)) if self.vary == "both" else 0
                hint = f" (--points {per_axis} for a 2-D grid)" if per_axis else ""
                problems.append(
                    f"{name} is {coupling}-coupled, so the sweep calls it once per point "
                    f"({calls} calls for {points} points), more than {MAX_COUPLED_CALLS}; "
                    f"sweep fewer points{hint}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _points_fit_the_kept_set(self) -> SweepConfig:
        point = self.point_support()
        highest = {
            name: self.axis(name).max if name in SWEPT[self.vary] else self.axis(name).fixed
            for name in AXES
        }
        problems = feasibility_problems(
            highest["pi_old"], highest["pi_theta"], point.kept_mass, point.old_kept_mass
        )
        if point.kept_mass < 1 and self.check.vocab_size < 4:
            problems.append(
                f"check.vocab_size = {self.check.vocab_size}: a kept set smaller than the "
                "vocabulary (support.kept_mass < 1) needs at least 4 tokens in the check's "
                "explicit distribution (half kept, half outside)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def axis(self, name: str) -> AxisConfig:
        return self.pi_old if name == "pi_old" else self.pi_theta

    def point_support(self) -> PointSupport:
        """The kept set of every point, and whether the loss replays it."""
        return self.support.point(self.loss.sampling_support == "kept")


# ----------------------------------------------------------------------------- keys

# The loss settings that act outside the loss functions (sweep.md), and why the sweep refuses
# them anywhere (`SweepConfig._only_what_is_drawn`, and as `over` keys).
NOT_DRAWN_SETTINGS = ("corrections", "entropy_coef", "top_entropy_quantile", "distill")
NOT_DRAWN = (
    "the sweep draws the loss functions at single tokens, and this acts outside them (a point "
    "has no rollout policy, no batch to take a quantile or a mean over, no teacher)"
)
# Keys that shape the grid or the run rather than the loss: they cannot be `over` keys.
_NOT_SWEPT = {
    **{f"loss.{name}": NOT_DRAWN for name in NOT_DRAWN_SETTINGS},
    "losses": "name several losses with --losses (each loss is already its own curve)",
    "vary": "it chooses the axes; run one sweep per axis",
    "over": "it is the list of swept keys itself",
    "check": "it only configures the autograd check",
    **{
        f"{axis}.{field}": "it defines the axis; set the range with --min/--max/--points/--scale"
        for axis in AXES
        for field in ("min", "max", "points", "scale")
    },
}


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config model inside a field's annotation (``X``, ``X | None``), or None for a value."""
    inner = getattr(annotation, "__args__", (annotation,))
    return next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)


def section_keys(path: list[str]) -> list[str]:
    """The keys allowed in the section at ``path`` (empty when ``path`` is not a section)."""
    model: type[BaseModel] | None = SweepConfig
    for part in path:
        field = model.model_fields.get(part) if model is not None else None
        model = _section(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []


def over_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be swept with ``over`` (None when it can): unknown, a section, ..."""
    path = key.split(".")
    if any(not part for part in path):
        return f"{key!r}: empty component in the dotted key"
    for prefix in (".".join(path[: i + 1]) for i in range(len(path))):
        if prefix in _NOT_SWEPT:
            return f"{key} cannot be swept with over: {_NOT_SWEPT[prefix]}"
    model: type[BaseModel] | None = SweepConfig
    for i, part in enumerate(path):
        if model is None:
            return f"{key}: {'.'.join(path[:i])} is a value, not a section"
        fields = model.model_fields
        if part not in fields:
            where = f"in section {'.'.join(path[:i])}" if i else "at the top level"
            return f"{key}: {where}, {unknown_name_message('key', part, sorted(fields))}"
        model = _section(fields[part].annotation)
    if model is not None:
        return f"{key} is a section; sweep one of its keys: {', '.join(sorted(model.model_fields))}"
    return None


def format_problem(err: Any) -> str:
    """One pydantic error of a `SweepConfig` as 'dotted.path: what is wrong (got X)'.

    `gradlens.config.format_error` words every error; only its list of allowed keys for an
    unknown key is specific to the ``compare`` config, so that case is worded here.
    """
    if err["type"] == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        allowed = section_keys(loc[:-1])
        return f"{'.'.join(loc)}: unknown key; allowed here: {', '.join(allowed)}"
    return format_error(err)


# ----------------------------------------------------------------------------- loading


def validate_sweep(data: dict[str, Any], origin: str = "the sweep configuration") -> SweepConfig:
    """`SweepConfig` from a plain mapping, or one `GradlensError` listing every problem."""
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        lines = [format_problem(err) for err in exc.errors()]
        raise GradlensError(
            f"{origin} has {len(lines)} problem(s):\n  " + "\n  ".join(lines)
        ) from None


def parse_over(text: str) -> tuple[str, list[Any]]:
    """``'loss.eps_high=0.2,0.28,0.4'`` → ('loss.eps_high', [0.2, 0.28, 0.4]).

    The values are read as one YAML flow sequence, so ``null``, numbers, strings and
    bracketed lists all work: ``loss.dual_clip=null,3``.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise GradlensError(
            f"--over {text!r}: expected KEY=V1,V2,..., e.g. --over loss.eps_high=0.2,0.28,0.4"
        )
    try:
        values = load_yaml(f"[{raw}]")
    except yaml.YAMLError as exc:
        raise GradlensError(
            f"--over {text!r}: the values are not a comma-separated list ({yaml_problem(exc, 1)})"
        ) from None
    if len(values) == 1 and isinstance(values[0], list) and raw.strip().startswith("["):
        values = values[0]  # the bracketed form --parity-matrix takes: [v1, v2] lists values
    if not values:
        raise GradlensError(f"--over {text!r}: no values; give at least one, e.g. {key}=0.2,0.4")
    twice = repeated_value(values)
    if twice is not None:
        raise GradlensError(
            f"--over {text!r}: {values[twice]!r} is given twice; each value makes one curve"
        )
    return key, values


def build_sweep_config(
    path: Path | None = None,
    sets: Iterable[str] = (),
    overs: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    axis: Mapping[str, Any] | None = None,
) -> SweepConfig:
    """Merge defaults < file < ``--set`` < flags, add ``--over``, validate config and variants.

    Args:
        path: YAML file, or None for the built-in default.
        sets: ``key=value`` overrides, as for ``compare``.
        overs: ``key=v1,v2,...`` settings to compare; a key also in the file's ``over``
            replaces it there.
        flags: dotted key → value of the explicit options (None: not given).
        axis: ``min``/``max``/``points``/``scale`` from the options, applied to the swept
            axis, or to both axes of a 2-D grid.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in sets:
        apply_override(data, *parse_override(text))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    for key, value in given.items():
        apply_override(data, key.split("."), value)

    vary = data.get("vary", SweepConfig.model_fields["vary"].default)
    swept = SWEPT.get(vary, ()) if isinstance(vary, str) else ()
    for name in swept:
        if f"{name}.fixed" in given:
            raise GradlensError(
                f"--{name.replace('_', '-')} fixes {SYMBOL[name]}(y), but vary = {vary} sweeps "
                f"it; set its range with --min/--max instead"
            )
    for key, value in (axis or {}).items():
        if value is not None:
            for name in swept:
                apply_override(data, [name, key], value)

    swept_by: dict[str, str] = {}  # key → its --over (a config file's over is replaced)
    for text in overs:
        key, values = parse_over(text)
        if key in swept_by:
            raise GradlensError(
                f"--over {text!r}: {key} is already swept by --over {swept_by[key]!r}; give "
                "its values in one --over"
            )
        swept_by[key] = text
        over = data.setdefault("over", {})
        if not isinstance(over, dict):
            raise GradlensError("over: must be a mapping of dotted keys to lists of values")
        over[key] = values

    origin = f"config file {str(path)!r}" if path is not None else "the sweep configuration"
    config = validate_sweep(data, origin)
    expand_over(config)  # every combination of the swept values must be valid too
    return config


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One combination of the ``over`` values, and the config it yields.

    Attributes:
        label: ``"default"`` without ``over``, else e.g. ``"loss.eps_high=0.2"``.
        settings: dotted key → the validated value of this variant.
        config: the whole config with those values applied (its own ``over`` is empty).
    """

    label: str
    settings: dict[str, Any]
    config: SweepConfig


def show_value(value: Any) -> str:
    """A setting as a user would type it: null, true, 0.28, token_mean."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _lookup(config: BaseModel, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def expand_over(config: SweepConfig) -> list[Variant]:
    """Every combination of the ``over`` values as a validated `Variant`, in product order."""
    if not config.over:
        return [Variant("default", {}, config)]
    base = config.model_dump(mode="python")
    base["over"] = {}
    keys = list(config.over)
    variants: list[Variant] = []
    problems: dict[str, None] = {}  # ordered set: one bad value shows up in many combinations
    for combination in itertools.product(*(config.over[k] for k in keys)):
        data = copy.deepcopy(base)
        for key, value in zip(keys, combination, strict=True):
            apply_override(data, key.split("."), value)
        try:
            variant = SweepConfig.model_validate(data)
        except ValidationError as exc:
            problems.update(dict.fromkeys(format_problem(err) for err in exc.errors()))
            continue
        settings = {key: _lookup(variant, key) for key in keys}
        label = ", ".join(f"{k}={show_value(v)}" for k, v in settings.items())
        variants.append(Variant(label, settings, variant))
    if problems:
        lines = list(problems)
        raise GradlensError(
            f"over: {len(lines)} problem(s) with the swept values:\n  " + "\n  ".join(lines)
        )
    return variants
