"""Per-parameter squared norms of each loss's gradient, taken as each gradient is complete.

A whole-model gradient is reduced to norms per tensor group; the squares ‖g_p‖² of each
parameter p are all that is kept (`GradientSink`), each accumulated in float64 from the
parameter's own dtype (`square_sum`), so the gradient itself is freed as soon as it is read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# elements squared at a time in float64: a 2 MB copy, which stays in the cache and whose memory
# the allocator hands back for the next chunk (a 32 MB chunk is a fresh mapping each time, paid in
# page faults: 80 ms for a 49,152 × 576 gradient against 11 ms in 2 MB chunks, on 2 cores)
SQUARE_CHUNK = 1 << 18


def square_sum(t: Tensor) -> float:
    """Σ t² accumulated in float64, a chunk at a time (no float64 copy of a large tensor).

    Each float32 square is exact in float64 (48 significant bits), so the only rounding is the
    float64 accumulation; a float32 sum of 28M squares is off by parts in a thousand. A sparse
    ``t`` is summed over its coalesced values (a row named twice is one row, its parts added)."""
    if t.is_sparse:
        t = t.coalesce().values()
    total = 0.0
    for chunk in t.reshape(-1).split(SQUARE_CHUNK):
        wide = chunk.double()
        total += float(torch.dot(wide, wide))
    return total


class GradientSink:
    """Receives each parameter's gradient, per loss, and keeps only what is needed.

    ``squares[loss][key]``: ‖g‖² of each parameter once its gradient is complete. Between
    micro-batches the gradients are summed in ``partial`` (``final`` false). With tied
    embeddings (one tensor E for the input embedding and the lm_head) the trainer's gradient of
    E is the sum of the logit path's G_W = g_W'[:, :H] and the embedding lookup's G_E, and

        ‖G_W + G_E‖² = ‖G_W‖² + ‖G_E‖² + 2⟨G_W, G_E⟩,

    where G_E is zero outside the rows R of the batch's input ids: so only the rows R of
    whichever half arrives first are held ([|R|, H], not [V, H]) until the other half gives the
    inner product. ``squares[loss]`` then also has ``"tied"`` = ‖G_W + G_E‖² and ``"bias"`` =
    ‖g_W'[:, H:]‖² (an lm_head bias column). G_E may come dense ([V, H]) or as the rows the
    lookup touched (a sparse tensor: `gradlens.sources.forward.row_gradient_embedding`), which
    is never widened to [V, H].
    """

    def __init__(self, emb: nn.Parameter, head: Tensor, tied: bool, rows: Tensor) -> None:
        self.emb_key, self.head_key = id(emb), id(head)
        self.hidden_size = int(emb.shape[1])
        self.tied = tied
        self.rows = rows  # R: the input ids, sorted and unique
        self.partial: dict[str, dict[int, Tensor]] = {}
        self.halves: dict[str, dict[str, Any]] = {}
        self.squares: dict[str, dict[int | str, float]] = {}

    def receive(self, loss: str, p: Tensor, g: Tensor, final: bool) -> None:
        key = id(p)
        partial = self.partial.setdefault(loss, {})
        if key in partial:
            g = partial.pop(key).add_(g)
        if not final:
            partial[key] = g
            return
        if g.is_sparse:  # rows named twice added once, for the squares and the rows alike
            g = g.coalesce()
        squares = self.squares.setdefault(loss, {})
        if not self.tied or key not in (self.emb_key, self.head_key):
            squares[key] = square_sum(g)
            return
        h = self.hidden_size
        if key == self.head_key:
            self.receive_head(loss, square_sum(g[:, :h]), square_sum(g[:, h:]), g[self.rows, :h])
            return
        squares[key] = square_sum(g)
        self._pair(loss, "emb", squares[key], self._rows_of(g))

    def receive_head(
        self, loss: str, weight_sq: float, bias_sq: float, rows: Tensor | None
    ) -> None:
        """The lm_head's logit-path gradient of the whole batch given by what is kept of it
        (`gradlens.compare.logp_tail`): ‖g_W'[:, :H]‖², ‖g_W'[:, H:]‖² (0 without a bias column)
        and, with tied embeddings, its rows R [|R|, H]."""
        squares = self.squares.setdefault(loss, {})
        squares[self.head_key] = weight_sq + bias_sq
        if self.tied:
            assert rows is not None, "tied embeddings need the lm_head gradient's rows R"
            squares["bias"] = bias_sq
            self._pair(loss, "head", weight_sq, rows)

    def _pair(self, loss: str, half: str, square: float, rows: Tensor) -> None:
        """One half of a tied pair; with both, ``"tied"`` = ‖G_W + G_E‖² (class docstring)."""
        halves = self.halves.setdefault(loss, {})
        halves[half] = (square, rows)
        if len(halves) == 2:
            (head_sq, head_rows), (emb_sq, emb_rows) = halves.pop("head"), halves.pop("emb")
            cross = float((head_rows.double() * emb_rows.double()).sum())
            self.squares.setdefault(loss, {})["tied"] = head_sq + emb_sq + 2 * cross

    def _rows_of(self, g: Tensor) -> Tensor:
        """[|R|, H] the rows R of the embedding's gradient ``g`` (dense [V, H] or sparse and
        coalesced), which must be zero outside R."""
        if not g.is_sparse:
            outside = g.abs().amax(dim=1) > 0  # [V]: rows with a gradient
            outside[self.rows] = False
            assert not bool(outside.any()), "the input embedding's gradient has rows off R"
            return g[self.rows]
        ids, values = g.indices()[0], g.values()
        # R is sorted: each id's place in R, checked to be that id
        where = torch.searchsorted(self.rows, ids).clamp(max=len(self.rows) - 1)
        off = bool((self.rows[where] != ids).any())
        assert not off, "the input embedding's gradient has rows off R"
        rows = values.new_zeros(len(self.rows), values.shape[1])
        return rows.index_copy_(0, where, values)

    def flush(self) -> None:
        """Finish a tied pair of which one half received no gradient."""
        for loss, halves in self.halves.items():
            squares = self.squares.setdefault(loss, {})
            for half in halves.values():
                squares["tied"] = half[0]
            halves.clear()
