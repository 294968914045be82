"""A batch written out position by position, for hand-computed cases.

Each position states its distribution (``logits`` or ``probs``; z = log π for probs, which is
exact up to a constant shift the softmax ignores), its sampled token, π_old(y) (``old_prob``
or ``old_logp``; on-policy when neither is given) and its advantage. Optionally it states the
inference engine's μ_old(y) (``rollout_prob``/``rollout_logp``) and a reference π_ref(y)
(``ref_prob``/``ref_logp``); a position that states none takes π_old(y), and a batch in which
no position states one has none (``rollout_logp``/``ref_logp`` None). A sequence may state its
prompt ``group`` (all or none of them do), which group-coupled losses (``real``) need. A
distillation teacher (``loss.distill``, ``opd``) is stated per position too, on every position
or none: its distribution (``teacher_logits`` or ``teacher_probs``), its stored top-k
(``teacher_topk_ids`` with ``teacher_topk_probs``) and log q(y) (``teacher_logp``).

So that the lm_head analysis runs through the same code as every other source, position k of
the M positions gets the hidden state h_k = e_k ∈ R^M and the lm_head W = [z_1 … z_M] ∈ R^{V×M}:
then W h_k = z_k exactly, and column k of ∂L/∂W is the logit gradient of position k, so the
norm of vocabulary row v is the norm of (∂L/∂z_{k,v})_k over positions.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gradlens.config import LiteralPosition, LiteralSource
from gradlens.containers import Batch, Namer, Origin, Teacher
from gradlens.logits import compute_logits, softmax_dtype, token_logp
from gradlens.memory import Estimate, Shape, dtype_bytes
from gradlens.sources.base import SourceContext, SourcePlan


def build_literal(src: LiteralSource, ctx: SourceContext) -> Batch:
    """The batch described by a `LiteralSource` section."""
    positions = [(i, t, p) for i, s in enumerate(src.sequences) for t, p in enumerate(s.positions)]
    n, t_max, m = len(src.sequences), max(len(s.positions) for s in src.sequences), len(positions)
    v = positions[0][2].vocab_size
    device, dtype = ctx.device, ctx.dtype
    acc = softmax_dtype(dtype)

    hidden = torch.zeros(n, t_max, m, dtype=torch.float64)  # [N, T, M]
    weight = torch.zeros(v, m, dtype=torch.float64)  # [V, M]
    tokens = torch.zeros(n, t_max, dtype=torch.long)
    mask = torch.zeros(n, t_max, dtype=torch.bool)
    advantages = torch.zeros(n, t_max, dtype=torch.float64)
    old_logp = torch.zeros(n, t_max, dtype=torch.float64)
    on_policy = torch.zeros(n, t_max, dtype=torch.bool)
    # μ_old and π_ref where stated (NaN: not stated → π_old(y) at that position)
    rollout = torch.full((n, t_max), math.nan, dtype=torch.float64)
    ref = torch.full((n, t_max), math.nan, dtype=torch.float64)
    for k, (i, t, p) in enumerate(positions):
        hidden[i, t, k] = 1.0
        z = p.logits if p.logits is not None else [math.log(x) for x in p.probs or ()]
        weight[:, k] = torch.tensor(z, dtype=torch.float64)
        tokens[i, t], mask[i, t], advantages[i, t] = p.token, True, p.advantage
        if p.old_prob is not None:
            old_logp[i, t] = math.log(p.old_prob)
        elif p.old_logp is not None:
            old_logp[i, t] = p.old_logp
        else:
            on_policy[i, t] = True
        for grid, prob, logp in (
            (rollout, p.rollout_prob, p.rollout_logp),
            (ref, p.ref_prob, p.ref_logp),
        ):
            if prob is not None:
                grid[i, t] = math.log(prob)
            elif logp is not None:
                grid[i, t] = logp

    hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
    current = token_logp(compute_logits(hidden_c, weight_c), tokens)  # [N, T]
    teacher = literal_teacher(src, positions, hidden_c, tokens, mask)
    old = torch.where(on_policy, current, old_logp.to(acc))  # the on-policy value, for display

    def stated(grid: torch.Tensor) -> torch.Tensor | None:
        """The stated log-probs, π_old(y) where a position states none; None if none does."""
        given = ~torch.isnan(grid) & mask
        if not given.any():
            return None
        return torch.where(given, grid.to(acc), old).to(device)

    return Batch(
        hidden=hidden_c.to(device),
        weight=weight_c.to(device),
        tokens=tokens.to(device),
        mask=mask.to(device),
        old_logp=old.to(device),
        advantages=advantages.to(acc).to(device),
        rollout_logp=stated(rollout),
        ref_logp=stated(ref),
        on_policy=on_policy.to(device),
        groups=None
        if src.sequences[0].group is None
        else torch.tensor([s.group for s in src.sequences], dtype=torch.long, device=device),
        teacher=None if teacher is None else to_device(teacher, device),
        source=f"literal: {n} sequence(s), {m} position(s), V={v} (h_k = e_k, W = [z_1 … z_M])"
        + ("" if teacher is None else "; a teacher stated per position"),
        advantage_note="stated literally per position",
        origin=Origin(position_names(src, [(i, t) for i, t, _ in positions])),
    )


def literal_teacher(
    src: LiteralSource,
    positions: list[tuple[int, int, LiteralPosition]],
    hidden: Tensor,
    tokens: Tensor,
    mask: Tensor,
) -> Teacher | None:
    """The positions' teacher, if they state one: the full distribution as a second lm_head
    W' = [z'_1 … z'_M] on the same h_k = e_k (W' h_k = z'_k exactly), the stored top-k ids and
    log-probs [N, T, K] (padding: ids 0 … K − 1, log-prob 0, never read), and log q(y): stated,
    or log softmax(z'_k)(y) from the full distribution."""
    first = positions[0][2]
    if first.teacher_full is None and first.teacher_topk_ids is None:
        return None
    n, t = mask.shape
    acc = softmax_dtype(hidden.dtype)
    pair = None
    if first.teacher_full is not None:
        columns = [p.teacher_full or [] for _, _, p in positions]
        pair = torch.tensor(columns, dtype=torch.float64).T.to(hidden.dtype)  # [V, M]
    ids = logp = None
    if first.teacher_topk_ids is not None:
        k = len(first.teacher_topk_ids)
        ids = torch.arange(k).repeat(n, t, 1)  # [N, T, K]
        logp = torch.zeros(n, t, k, dtype=torch.float64)
        for i, j, p in positions:
            ids[i, j] = torch.tensor(p.teacher_topk_ids or [])
            probs = p.teacher_topk_probs or []
            logp[i, j] = torch.tensor([math.log(x) for x in probs], dtype=torch.float64)
    sampled = None
    if first.teacher_logp is not None:
        sampled = torch.zeros(n, t, dtype=torch.float64)
        for i, j, p in positions:
            sampled[i, j] = p.teacher_logp or 0.0
    elif pair is not None:
        sampled = torch.where(mask, token_logp(compute_logits(hidden, pair), tokens), 0.0)
    return Teacher(
        hidden=None if pair is None else hidden,
        weight=pair,
        topk_ids=ids,
        topk_logp=None if logp is None else logp.to(acc),
        sampled_logp=None if sampled is None else sampled.to(acc),
    )


def to_device(teacher: Teacher, device: torch.device) -> Teacher:
    """``teacher`` with every tensor on ``device``."""
    moved = {
        f.name: None if getattr(teacher, f.name) is None else getattr(teacher, f.name).to(device)
        for f in dataclasses.fields(teacher)
    }
    return Teacher(**moved)


def plan_literal(src: LiteralSource, ctx: SourceContext) -> SourcePlan:
    """The batch's sizes and the source's peak memory: M positions, hidden [N, T, M] and
    W [V, M] in float64 and the run's dtype, the [N, T, V] logits in the softmax dtype."""
    positions = [p for s in src.sequences for p in s.positions]
    n, t, m = len(src.sequences), max(len(s.positions) for s in src.sequences), len(positions)
    v = positions[0].vocab_size
    s, acc = dtype_bytes(ctx.dtype), dtype_bytes(softmax_dtype(ctx.dtype))
    provides = set()
    for name in ("rollout", "ref"):
        if any(
            getattr(p, f"{name}_prob") is not None or getattr(p, f"{name}_logp") is not None
            for p in positions
        ):
            provides.add(f"{name}_logp")
    if positions[0].teacher_full is not None:
        provides |= {"teacher", "teacher_full", "teacher_logp"}
    if positions[0].teacher_topk_ids is not None:
        provides.add("teacher")
    if positions[0].teacher_logp is not None:
        provides.add("teacher_logp")
    return SourcePlan(
        memory=(
            Estimate(
                "the literal source",
                "source.sequences",
                (
                    ("hidden states [N, T, M]", n * t * m * (8 + s)),
                    ("lm_head [V, M]", v * m * (8 + s)),
                    ("logits [N, T, V]", n * t * v * acc * 2),
                ),
                host=True,
            ),
        ),
        shape=Shape(n, t, v, m, tokens=m),
        provides=frozenset(provides),
    )


# The fields a position that does not state them takes as π_old(y) (its old_prob/old_logp, or
# the on-policy π(y) of its logits or probs).
DEFAULTS_TO_OLD = ("rollout_logp", "ref_logp")
# The key of a position that states each per-token field (the first one given), by field.
STATED = {
    "tokens": ("token",),
    "mask": ("token",),
    "advantages": ("advantage",),
    "old_logp": ("old_prob", "old_logp"),
    "rollout_logp": ("rollout_prob", "rollout_logp"),
    "ref_logp": ("ref_prob", "ref_logp"),
    "hidden": ("logits", "probs"),
    "weight": ("logits", "probs"),
    "teacher_hidden": ("teacher_logits", "teacher_probs"),
    "teacher_weight": ("teacher_logits", "teacher_probs"),
    "teacher_topk_ids": ("teacher_topk_ids",),
    "teacher_topk_logp": ("teacher_topk_probs",),
    "teacher_logp": ("teacher_logp", "teacher_logits", "teacher_probs"),
}


def position_names(src: LiteralSource, positions: list[tuple[int, int]]) -> Namer:
    """Each entry by the path of the position that states it (`Origin.name`):
    ``source.sequences[i].positions[j].field``. Column k of the hidden states and of W is
    position k's distribution."""

    def name(field: str, index: tuple[int, ...]) -> str:
        if field in ("weight", "teacher_weight") and len(index) == 2:
            i, t = positions[index[1]]
        elif field in STATED and len(index) >= 2:
            i, t = index[0], index[1]
        else:
            return f"source.sequences (the batch's {field})"
        if i >= len(src.sequences) or t >= len(src.sequences[i].positions):
            return f"source.sequences (padding at sequence {i}, position {t})"
        pos: LiteralPosition = src.sequences[i].positions[t]
        keys = STATED[field]
        key = next((k for k in keys if getattr(pos, k) is not None), None)
        if key is None and field in DEFAULTS_TO_OLD:  # not stated: π_old(y), by its own keys
            key = next((k for k in STATED["old_logp"] if getattr(pos, k) is not None), None)
            where = f"source.sequences[{i}].positions[{t}]"
            given = key or next(k for k in STATED["hidden"] if getattr(pos, k) is not None)
            return f"{where}.{given} (π_old(y), which {keys[0]} defaults to)"
        return f"source.sequences[{i}].positions[{t}].{key or keys[0]}"

    return name
