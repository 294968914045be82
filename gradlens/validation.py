"""One rule for the data of every batch, whatever its source.

Every source (a literal config, the synthetic settings, a batch file, the model, a `Batch`
built in Python) ends in the same `check_batch`, called by `gradlens.sources.build_source` right
after the batch is built, so `compare` and `dump` see the same rule. It checks:

- shapes: ``tokens``, ``mask`` and every per-token tensor on one [N, T] grid, ``hidden``
  [N, T, H], ``weight`` [V, H] with the same H; ``mask`` boolean, token ids integers;
- at every position in the loss (``mask`` true): token ids in [0, V); finite advantages and
  log-probs (π_old, μ_old, π_ref), each log-prob ≤ 0 (a log-probability is the log of a number
  in (0, 1]); finite hidden states;
- every entry of the lm_head ``weight`` finite (every row enters the softmax);
- the distillation teacher (`gradlens.containers.Teacher`), when the batch has one, under the
  names a batch file gives its keys: ``teacher_hidden`` [N, T, H'] with ``teacher_weight``
  [V, H'] (and ``teacher_bias`` [V]), or ``teacher_logits`` [N, T, V], finite (the weight and
  bias everywhere, the rest at positions in the loss); ``teacher_topk_ids`` [N, T, K] integers
  in [0, V), distinct within each position, with ``teacher_topk_logp`` [N, T, K]; and
  ``teacher_logp`` [N, T]: every log-prob finite and ≤ 0.

Values at masked positions are never read and may hold anything.

What the user gave (the batch file's tensors, the literal positions, the settings of the
synthetic source) is refused with one `GradlensError` that lists every problem at once, each
named as the user wrote it (`gradlens.containers.Origin`: the file's key, the literal position's
path ``source.sequences[i].positions[j].field``, the synthetic setting). What a model computed
(`Origin.computed`: its hidden states and log-probs) is not the user's input: a non-finite value
there shows up as non-finite gradients, and the report's finding traces it to its tensor and
position (`gradlens.diagnostics.non_finite`).

Tensors are scanned in blocks of their first dimension, so that no check allocates a copy of a
large hidden-state or lm_head tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch, Teacher
from gradlens.errors import GradlensError

BLOCK_ELEMENTS = 1 << 24  # entries scanned at once (16 Mi: 16 MiB of bool mask per block)
PER_TOKEN = ("advantages", "old_logp", "rollout_logp", "ref_logp")
LOG_PROBS = ("old_logp", "rollout_logp", "ref_logp")
MAX_LISTED = 20  # problems listed in one message


@dataclass(frozen=True)
class Problem:
    """What is wrong with one field: its first offending entry and how many there are."""

    field: str
    index: tuple[int, ...]
    what: str
    count: int = 1

    def message(self, batch: Batch) -> str:
        more = f" ({self.count} in all)" if self.count > 1 else ""
        return f"{batch.origin.name(self.field, self.index)}: {self.what}{more}"


@dataclass(frozen=True)
class Found:
    """The first entry (row-major) where a test holds, its value, and how many entries do."""

    index: tuple[int, ...]
    value: float
    count: int


def find(x: Tensor, bad: Callable[[Tensor], Tensor], valid: Tensor | None = None) -> Found | None:
    """The entries of ``x`` where ``bad(x)`` holds, among those where ``valid`` [N, T] does.

    ``valid`` covers the first two dimensions of ``x`` (None: every entry counts). ``x`` is
    scanned in blocks of its first dimension.
    """
    if x.numel() == 0:
        return None
    per_row = max(x[0].numel(), 1)
    step = max(1, BLOCK_ELEMENTS // per_row)
    first: Found | None = None
    count = 0
    for start in range(0, x.shape[0], step):
        block = bad(x[start : start + step])
        if valid is not None:
            v = valid[start : start + step]
            block = block & v.reshape(*v.shape, *([1] * (block.dim() - v.dim())))
        n = int(block.sum())
        if n and first is None:
            flat = int(block.reshape(-1).to(torch.uint8).argmax())
            local = torch.unravel_index(torch.tensor(flat), block.shape)
            index = (start + int(local[0]), *(int(i) for i in local[1:]))
            first = Found(index, float(x[index]), 0)
        count += n
    if first is None:
        return None
    return Found(first.index, first.value, count)


def non_finite(x: Tensor) -> Tensor:
    return ~torch.isfinite(x)


def all_finite(x: Tensor) -> bool:
    """True when the sum of ``x`` is finite, which proves every entry finite (a NaN or an
    infinity makes any sum NaN or infinite): one read of ``x`` instead of a mask of it. False
    says nothing (finite entries may overflow the sum): the caller then scans entry by entry."""
    return x.numel() == 0 or bool(torch.isfinite(x.sum()))


def describe(value: float) -> str:
    """'NaN', '+inf', '-inf' or the number."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def _shape_problems(batch: Batch) -> list[Problem]:
    out = []
    grid = tuple(batch.tokens.shape)
    if batch.tokens.dim() != 2:
        return [Problem("tokens", (), f"has shape {grid}; expected [N, T]")]
    for name in ("mask", *PER_TOKEN, "on_policy"):
        x = getattr(batch, name)
        if x is not None and tuple(x.shape) != grid:
            out.append(Problem(name, (), f"has shape {tuple(x.shape)}; expected [N, T] = {grid}"))
    for name in ("mask", "on_policy"):
        x = getattr(batch, name)
        if x is not None and x.dtype != torch.bool:
            out.append(Problem(name, (), f"has dtype {x.dtype}; expected torch.bool"))
    if batch.tokens.is_floating_point() or batch.tokens.dtype == torch.bool:
        out.append(Problem("tokens", (), f"has dtype {batch.tokens.dtype}; token ids are integers"))
    for name in PER_TOKEN:
        x = getattr(batch, name)
        if x is not None and not x.is_floating_point():
            out.append(Problem(name, (), f"has dtype {x.dtype}; expected a floating-point dtype"))
    if batch.weight.dim() != 2:
        out.append(Problem("weight", (), f"has shape {tuple(batch.weight.shape)}; expected [V, H]"))
    elif batch.hidden.dim() != 3 or tuple(batch.hidden.shape) != (*grid, batch.weight.shape[1]):
        out.append(
            Problem(
                "hidden",
                (),
                f"has shape {tuple(batch.hidden.shape)}; expected [N, T, H] = "
                f"{(*grid, batch.weight.shape[1])} (H from the lm_head weight)",
            )
        )
    for name in ("hidden", "weight"):
        x = getattr(batch, name)
        if not x.is_floating_point():
            out.append(Problem(name, (), f"has dtype {x.dtype}; expected a floating-point dtype"))
    return out


def batch_problems(batch: Batch, skip: frozenset[str] = frozenset()) -> list[Problem]:
    """Everything wrong with ``batch`` by the rule of the module docstring, field by field;
    the values of the fields in ``skip`` are not read."""
    shapes = _shape_problems(batch)
    if shapes:
        return shapes  # the values cannot be read position by position
    out = []
    mask = batch.mask
    v = batch.vocab_size
    found = None
    if "tokens" not in skip:
        found = find(batch.tokens, lambda y: (y < 0) | (y >= v), mask)
    if found is not None:
        out.append(
            Problem(
                "tokens",
                found.index,
                f"token id {int(found.value)} is outside the vocabulary [0, {v}) of the lm_head",
                found.count,
            )
        )
    for name in PER_TOKEN:
        x = getattr(batch, name)
        if x is None or name in skip:
            continue
        valid = mask
        if name == "old_logp" and batch.on_policy is not None:
            valid = mask & ~batch.on_policy  # there π_old is π_θ itself: the value is not read
        found = find(x, non_finite, valid)
        if found is not None:
            out.append(
                Problem(
                    name,
                    found.index,
                    f"{describe(found.value)} at a position in the loss; every value the loss "
                    "reads must be a finite number",
                    found.count,
                )
            )
        elif name in LOG_PROBS:
            found = find(x, lambda lp: lp > 0, valid)
            if found is not None:
                out.append(
                    Problem(
                        name,
                        found.index,
                        f"log-probability {found.value:.6g} > 0; a log-probability is ≤ 0 (a "
                        "kernel that returns positive log-probs is broken)",
                        found.count,
                    )
                )
    dtype = str(batch.weight.dtype).removeprefix("torch.")
    for name, valid_hidden in (("hidden", mask), ("weight", None)):
        if name in skip or (valid_hidden is None and all_finite(getattr(batch, name))):
            continue
        found = find(getattr(batch, name), non_finite, valid_hidden)
        if found is not None:
            where = " at a position in the loss" if name == "hidden" else ""
            out.append(
                Problem(
                    name,
                    found.index,
                    f"{describe(found.value)}{where} (in the run's dtype {dtype}); every entry "
                    "must be a finite number representable in that dtype",
                    found.count,
                )
            )
    return out


TEACHER_FIELDS = (
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "teacher_logits",
    "teacher_topk_ids",
    "teacher_topk_logp",
    "teacher_logp",
)


def teacher_tensors(teacher: Teacher) -> dict[str, Tensor]:
    """The teacher's tensors present, by the names of `TEACHER_FIELDS`."""
    named = {
        "teacher_hidden": teacher.hidden,
        "teacher_weight": teacher.weight,
        "teacher_bias": teacher.bias,
        "teacher_logits": teacher.logits,
        "teacher_topk_ids": teacher.topk_ids,
        "teacher_topk_logp": teacher.topk_logp,
        "teacher_logp": teacher.sampled_logp,
    }
    return {k: x for k, x in named.items() if x is not None}


def _teacher_shape_problems(batch: Batch, x: dict[str, Tensor]) -> list[Problem]:
    grid, v = tuple(batch.tokens.shape), batch.vocab_size
    out = []

    def shape(name: str, expected: str, ok: bool) -> None:
        if name in x and not ok:
            out.append(Problem(name, (), f"has shape {tuple(x[name].shape)}; expected {expected}"))

    for a, b, why in (
        ("teacher_hidden", "teacher_weight", "the teacher's logits W'·h' need both"),
        ("teacher_topk_ids", "teacher_topk_logp", "the stored top-k form needs both"),
    ):
        if (a in x) != (b in x):
            given, missing = (a, b) if a in x else (b, a)
            out.append(Problem(given, (), f"given without {missing}: {why}"))
    if "teacher_bias" in x and "teacher_weight" not in x:
        out.append(Problem("teacher_bias", (), "given without teacher_weight, whose bias it is"))
    if "teacher_logits" in x and "teacher_weight" in x:
        out.append(
            Problem(
                "teacher_logits",
                (),
                "given beside teacher_hidden/teacher_weight; give the teacher's logits or its "
                "hidden/weight pair, not both",
            )
        )
    hidden, weight = x.get("teacher_hidden"), x.get("teacher_weight")
    shape(
        "teacher_hidden",
        f"[N, T, H'] with [N, T] = {grid}",
        hidden is None or (hidden.dim() == 3 and tuple(hidden.shape[:2]) == grid),
    )
    h = None if hidden is None or hidden.dim() != 3 else int(hidden.shape[2])
    shape(
        "teacher_weight",
        f"[V, H'] = {(v, h)} (V: the student's vocabulary; H' from teacher_hidden)",
        weight is None or (weight.dim() == 2 and tuple(weight.shape) == (v, h or weight.shape[1])),
    )
    shape(
        "teacher_bias",
        f"[V] = ({v},)",
        "teacher_bias" not in x or (tuple(x["teacher_bias"].shape) == (v,)),
    )
    shape(
        "teacher_logits",
        f"[N, T, V] = {(*grid, v)}",
        "teacher_logits" not in x or (tuple(x["teacher_logits"].shape) == (*grid, v)),
    )
    ids, logp = x.get("teacher_topk_ids"), x.get("teacher_topk_logp")
    shape(
        "teacher_topk_ids",
        f"[N, T, K] with [N, T] = {grid} and K ≥ 1",
        ids is None or (ids.dim() == 3 and tuple(ids.shape[:2]) == grid and ids.shape[2] >= 1),
    )
    if ids is not None and logp is not None and tuple(logp.shape) != tuple(ids.shape):
        shape("teacher_topk_logp", f"[N, T, K] = {tuple(ids.shape)} like teacher_topk_ids", False)
    shape(
        "teacher_logp",
        f"[N, T] = {grid}",
        "teacher_logp" not in x or (tuple(x["teacher_logp"].shape) == grid),
    )
    for name, t in x.items():
        integer = name == "teacher_topk_ids"
        if integer and (t.is_floating_point() or t.dtype == torch.bool):
            out.append(Problem(name, (), f"has dtype {t.dtype}; token ids are integers"))
        elif not integer and not t.is_floating_point():
            out.append(Problem(name, (), f"has dtype {t.dtype}; expected a floating-point dtype"))
    return out


def repeated_ids(ids: Tensor) -> Tensor:
    """[..., K] True at an id that an earlier entry of its position repeats."""
    ordered, order = ids.sort(dim=-1, stable=True)  # the later of two equal ids is flagged
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return torch.zeros_like(repeat).scatter_(-1, order, repeat)


def teacher_problems(batch: Batch, skip: frozenset[str] = frozenset()) -> list[Problem]:
    """Everything wrong with the batch's teacher (module docstring), field by field."""
    if batch.teacher is None:
        return []
    x = teacher_tensors(batch.teacher)
    shapes = _teacher_shape_problems(batch, x)
    if shapes:
        return shapes
    mask, v = batch.mask, batch.vocab_size
    out = []
    every = "every value the loss reads must be a finite number"
    for name, valid in (
        ("teacher_hidden", mask),
        ("teacher_weight", None),
        ("teacher_bias", None),
        ("teacher_logits", mask),
        ("teacher_topk_logp", mask),
        ("teacher_logp", mask),
    ):
        if name not in x or name in skip:
            continue
        found = find(x[name], non_finite, valid)
        if found is not None:
            where = " at a position in the loss" if valid is not None else ""
            out.append(
                Problem(name, found.index, f"{describe(found.value)}{where}; {every}", found.count)
            )
        elif name in ("teacher_topk_logp", "teacher_logp"):
            found = find(x[name], lambda lp: lp > 0, valid)
            if found is not None:
                out.append(
                    Problem(
                        name,
                        found.index,
                        f"log-probability {found.value:.6g} > 0; a log-probability is ≤ 0",
                        found.count,
                    )
                )
    ids = x.get("teacher_topk_ids")
    if ids is not None and "teacher_topk_ids" not in skip:
        found = find(ids, lambda i: (i < 0) | (i >= v), mask)
        if found is not None:
            out.append(
                Problem(
                    "teacher_topk_ids",
                    found.index,
                    f"token id {int(found.value)} is outside the vocabulary [0, {v}) of the "
                    "lm_head",
                    found.count,
                )
            )
        else:
            found = find(ids, repeated_ids, mask)
            if found is not None:
                out.append(
                    Problem(
                        "teacher_topk_ids",
                        found.index,
                        f"token id {int(found.value)} appears twice in this position's top-k; "
                        "the teacher's top-k ids of one position are distinct",
                        found.count,
                    )
                )
    return out


def check_batch(batch: Batch) -> None:
    """Refuse a batch whose inputs break the rule, with every problem at once.

    Problems in the fields a model computed (`Origin.computed`) are left to the report.
    """
    computed = batch.origin.computed
    problems = [
        p
        for p in batch_problems(batch, computed) + teacher_problems(batch, computed)
        if p.field not in computed
    ]
    if not problems:
        return
    lines = [p.message(batch) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    raise GradlensError(f"the batch has {len(problems)} problem(s):\n  " + "\n  ".join(lines))
