"""Shared-prefix packing: the completions of one prompt in one row, after one copy of it.

A group of G sequences sampled from one prompt p = (p_1 … p_P) is, on the padded [N, L] grid,
G copies of p followed by G completions c^1 … c^G. In a causal LM the final hidden state of a
position depends only on the tokens up to it and their positions, so the G copies of p have
equal hidden states, and the forward computes them G times. Packed, the group is one row

    [ p_1 … p_P | c^1_1 … c^1_{C_1} | c^2_1 … | … | c^G_1 … c^G_{C_G} ]

with positions 0 … P−1 for the prompt and P … P + C_j − 1 for each completion (the grid's own
position ids), and an attention mask (a 4D mask [R, 1, L', L'], handed to the model as it is)
that lets query q see key k iff k ≤ q and k is in the prompt or in q's own completion. Then
every completion token sees exactly what it sees on the grid, at the same positions, and

    h_packed(c^j_i) = h_grid(c^j_i),   h_packed(p_i) = h_grid(p_i) of each copy,

up to rounding (the products have other shapes). The backward is the chain rule of the same
function: the cotangents that the G completions send to the one prompt copy add up, which is
what the G copies' parameter gradients sum to on the grid. So every number of a pass — π_old,
the stale steps, the whole-model gradients — is the padded batch's up to rounding, and the
forward computes Σ_g (P_g + Σ_j C_j) positions instead of N·L: for GRPO-style groups with
prompts as long as their completions, about half.

A group whose row would grow long is split into rows of k members each, each row with its own
copy of the prompt: k is the largest with (P + k·C_max)² ≤ `ATTENTION_FACTOR`·k·L² (the row's
attention is then at most that factor of the k grid rows it replaces). Rows are padded on the
right to the longest; a padding position attends to itself only (a query that sees no key
gives NaN, which a backward would spread). The layout is used only when it saves at least
`MIN_SAVING` of the positions, and only on a model that passes `packing_problem` (its forward
must honour a 4D mask: a model that builds its own mask from the 2D one or adds ALiBi biases
would not give the grid's hidden states, and one whose sliding window is shorter than the
sequences is not packed, since the mask as given replaces the window).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import Sequences

MIN_SAVING = 0.1  # pack only when it saves at least this fraction of the positions
ATTENTION_FACTOR = 2.0  # a packed row's attention: at most this factor of its rows' on the grid
# Relative difference allowed between the packed and the grid forward's hidden states in the
# check: the same computation with other product shapes (rounding, ~1e-6 in float32 through
# 30 blocks of a 135M-parameter model), where a mask the model ignores moves them by O(1).
PACKING_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
PACKING_TOLERANCE_LOW = 3e-2  # bf16/fp16: a few roundings of 2^-8


@dataclass(frozen=True)
class PackedLayout:
    """Where each grid position lies in the packed rows.

    Attributes:
        input_ids: [R, L'] the packed rows; padding holds the batch's first id, so that the
            embedding lookup reads only rows the batch names (a tied embedding's gradient is
            then zero outside the batch's ids, as `GradientSink` checks).
        position_ids: [R, L'] each packed token's position on the grid.
        allowed: [R, L', L'] bool, query q may attend to key k.
        source: [N, L] the flat index r·L' + c of each real grid position, 0 elsewhere.
        real: [N, L] bool, the grid's real positions (its attention mask).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    source: Tensor
    real: Tensor

    @property
    def positions(self) -> int:
        return int(self.input_ids.numel())


def _prompt_end(seqs: Sequences, row: int, start: int, end: int) -> int:
    """One past the last prompt token of ``row``: the token before its first loss token (the
    grid column t predicts token t + 1), or ``end`` when no token of it enters the loss."""
    scored = seqs.loss_mask[row].nonzero()
    return end if scored.numel() == 0 else min(int(scored[0]) + 1, end)


Member = tuple[int, int, int, int]  # (grid row, first real column, prompt end, end)


@dataclass(frozen=True)
class RowPlan:
    """Which sequences share each packed row (`plan_rows`), before any tensor is built.

    Attributes:
        rows: the members of each packed row, as (grid row, first real column, one past the
            prompt, one past the sequence); the first member's prompt is the row's.
        width: L', the longest row (every row is padded to it).
    """

    rows: list[list[Member]]
    width: int

    @property
    def positions(self) -> int:
        return len(self.rows) * self.width


def plan_rows(seqs: Sequences, min_saving: float = MIN_SAVING) -> RowPlan | None:
    """The rows of the packed layout (module docstring), or None when they would not save
    ``min_saving`` of the positions or the grid's real tokens are not contiguous."""
    n, width = (int(x) for x in seqs.input_ids.shape)
    if n < 2:
        return None
    ids_cpu, pos_cpu = seqs.input_ids.cpu(), seqs.position_ids.cpu()
    real_cpu = seqs.attention_mask.bool().cpu()
    groups: dict[bytes, list[Member]] = {}  # a prompt's tokens and positions → its sequences
    for row in range(n):
        cols = real_cpu[row].nonzero().squeeze(-1)
        if cols.numel() == 0:
            return None
        start, end = int(cols[0]), int(cols[-1]) + 1
        if end - start != cols.numel():  # a gap inside the sequence: not this layout
            return None
        cut = _prompt_end(seqs, row, start, end)
        key = ids_cpu[row, start:cut].numpy().tobytes() + pos_cpu[row, start:cut].numpy().tobytes()
        groups.setdefault(key, []).append((row, start, cut, end))

    rows: list[list[Member]] = []
    for members in groups.values():
        _, start, cut, _ = members[0]
        prompt = cut - start
        longest = max(end - c for _, _, c, end in members)
        k = 1
        while (
            k < len(members)
            and (prompt + (k + 1) * longest) ** 2 <= ATTENTION_FACTOR * (k + 1) * width**2
        ):
            k += 1
        rows += [members[i : i + k] for i in range(0, len(members), k)]
    packed_width = max(m[0][2] - m[0][1] + sum(end - cut for _, _, cut, end in m) for m in rows)
    plan = RowPlan(rows, packed_width)
    if plan.positions > (1 - min_saving) * n * width:
        return None
    if len(rows) * packed_width**2 > ATTENTION_FACTOR * n * width**2:
        return None
    return plan


def prefix_layout(seqs: Sequences, min_saving: float = MIN_SAVING) -> PackedLayout | None:
    """The packed layout of ``seqs`` (module docstring), or None where `plan_rows` finds
    none."""
    plan = plan_rows(seqs, min_saving)
    if plan is None:
        return None
    n, width = (int(x) for x in seqs.input_ids.shape)
    ids_cpu, pos_cpu = seqs.input_ids.cpu(), seqs.position_ids.cpu()
    count, packed_width = len(plan.rows), plan.width
    ids = torch.full((count, packed_width), int(ids_cpu[0, 0]), dtype=ids_cpu.dtype)
    pos = torch.zeros(count, packed_width, dtype=pos_cpu.dtype)
    segment = torch.full((count, packed_width), -2, dtype=torch.long)  # −1 prompt, j member, −2 pad
    source = torch.zeros(n, width, dtype=torch.long)
    for r, members in enumerate(plan.rows):
        row0, start, cut, _ = members[0]
        prompt = cut - start
        ids[r, :prompt] = ids_cpu[row0, start:cut]
        pos[r, :prompt] = pos_cpu[row0, start:cut]
        segment[r, :prompt] = -1
        at = prompt
        for j, (row, s, c, end) in enumerate(members):
            size = end - c
            ids[r, at : at + size] = ids_cpu[row, c:end]
            pos[r, at : at + size] = pos_cpu[row, c:end]
            segment[r, at : at + size] = j
            source[row, s:c] = r * packed_width + torch.arange(prompt)
            source[row, c:end] = r * packed_width + torch.arange(at, at + size)
            at += size
    q = torch.arange(packed_width)
    causal = q[:, None] >= q[None, :]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((seg_k == -1) | (seg_q == seg_k)) & (seg_q != -2)
    allowed |= torch.eye(packed_width, dtype=torch.bool)  # padding sees itself
    device = seqs.input_ids.device
    real = seqs.attention_mask.bool()
    return PackedLayout(ids.to(device), pos.to(device), allowed.to(device), source.to(device), real)


def attention_mask(model: Any, layout: PackedLayout, dtype: torch.dtype) -> Tensor:
    """The 4D mask [R, 1, L', L'] in the form the model's attention takes: bool (True: attend)
    for PyTorch's scaled_dot_product_attention, else additive (0 or the dtype's minimum)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation == "sdpa":
        return layout.allowed[:, None]
    additive = torch.zeros(layout.allowed.shape, dtype=dtype, device=layout.allowed.device)
    return additive.masked_fill(~layout.allowed, torch.finfo(dtype).min)[:, None]


def packed_hidden(base: Any, seqs: Sequences, layout: PackedLayout) -> Tensor:
    """[N, L, H] the base model's last hidden states on the grid, computed on the packed rows
    (0 at the grid's padding)."""
    dtype = base.get_input_embeddings().weight.dtype
    out = base(
        input_ids=layout.input_ids,
        attention_mask=attention_mask(base, layout, dtype),
        position_ids=layout.position_ids,
        use_cache=False,
    ).last_hidden_state  # [R, L', H]
    flat = out.reshape(-1, out.shape[-1])
    n, width = layout.source.shape
    grid = flat.index_select(0, layout.source.reshape(-1)).reshape(n, width, -1)
    return torch.where(layout.real[..., None], grid, torch.zeros_like(grid))


def pass_positions(seqs: Sequences, groups: list[list[int]]) -> dict[str, Any]:
    """`ModelPass`'s ``positions``, ``padded_positions`` and ``shared_prefix`` of one forward
    over ``seqs`` in the micro-batches ``groups``."""
    positions, packed = 0, False
    for rows in groups:
        part = seqs.select(rows)
        plan = plan_rows(part) if seqs.share_prefix else None
        positions += int(part.input_ids.numel()) if plan is None else plan.positions
        packed = packed or plan is not None
    padded = sum(len(rows) for rows in groups) * int(seqs.input_ids.shape[1])
    return {"positions": positions, "padded_positions": padded, "shared_prefix": packed}


@torch.no_grad()
def packing_problem(model: Any, seqs: Sequences) -> str | None:
    """Why ``seqs`` should not go through ``model`` packed, or None when they can: the packed
    and the grid forward of two sequences that share a prompt must give the same hidden states
    at every real position within `PACKING_TOLERANCE`."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    width = int(seqs.input_ids.shape[1])
    if isinstance(window, int) and 0 < window < width:
        # the mask as given replaces the model's own in every layer, its window included,
        # and a pair of short sequences would not show the difference
        return (
            f"the model attends within a sliding window of {window} positions, shorter than "
            f"the sequences ({width})"
        )
    pair, layout = None, None
    for first in range(int(seqs.input_ids.shape[0]) - 1):
        pair = seqs.select([first, first + 1])
        layout = prefix_layout(pair, min_saving=0.0)
        if layout is not None and layout.input_ids.shape[0] == 1:
            break
        layout = None
    if pair is None or layout is None:
        return "no two consecutive sequences share a prompt"
    base = model.base_model
    dtype = base.get_input_embeddings().weight.dtype
    plain = base(
        input_ids=pair.input_ids,
        attention_mask=pair.attention_mask,
        position_ids=pair.position_ids,
        use_cache=False,
    ).last_hidden_state
    try:
        packed = packed_hidden(base, pair, layout)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model's own code
        return f"its forward does not take a 4D attention mask ({type(exc).__name__}: {exc})"
    where = layout.real
    scale = float(plain[where].abs().max().clamp(min=1e-30))
    err = float((packed[where] - plain[where]).abs().max()) / scale
    tol = PACKING_TOLERANCE.get(dtype, PACKING_TOLERANCE_LOW)
    if not err <= tol:
        return (
            f"its forward with the packed 4D attention mask differs from the padded forward by "
            f"{err:.3g} > {tol:g} (relative): it does not honour the mask as given"
        )
    return None


def with_shared_prefix(model: Any, seqs: Sequences) -> tuple[Sequences, str | None]:
    """``seqs`` marked to go through ``model`` packed where packing saves positions and
    `packing_problem` finds none; the problem that kept them padded, or None (packed, or
    nothing to save)."""
    if plan_rows(seqs) is None:
        return seqs, None
    problem = packing_problem(model, seqs)
    return (seqs if problem is not None else replace(seqs, share_prefix=True)), problem


def padded_note(problem: str, what: str = "the sequences") -> str:
    """The report's note on a pass that `with_shared_prefix` kept padded, and why."""
    return f"source.shared_prefix: {what} went through padded: {problem}"
