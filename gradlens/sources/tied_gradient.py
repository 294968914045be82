"""A tied embedding's gradient: the lookup's rows added into the lm_head's, in place.

With tied embeddings one tensor E [V, H] is both the input embedding and the lm_head, and its
gradient is the sum of two parts: the logit path's G_W = Σ_t g_t h_tᵀ, dense, and the
lookup's G_E, whose row v is Σ_{t: x_t = v} ∂L/∂e_t over the input positions t (none for the
padding id), zero outside the rows of the batch's input ids. Autograd sums them as tensors:
the lookup's part as a zero-filled [V, H] (a dense ``nn.Embedding``), or as the rows it looked
up (``sparse``), which this torch adds into G_W out of place, a copy of G_W with the rows added.
Either way a second [V, H] tensor is written in fresh memory: 0.22 s per backward for
49,152 × 576 on the 2-core machine, in a profile of the stale steps.

Inside `tied_gradient_in_place`, each forward's lookup (`_Lookup`) is paired with the lm_head
read after it (`_HeadRead`, the identity on E). When the lookup will run in the same backward
(the engine's graph-task id and ``torch._C._will_engine_execute_node``, as
``torch.utils.checkpoint`` asks it), the head's backward keeps G_W instead of passing it on, and
the lookup's adds its rows into G_W in place (``index_add_``) and passes the sum on: E's
accumulator receives G_W + G_E as one dense tensor, with only the rows written. The head's
backward comes first — the lookup's gradient needs the one through every block, G_W only the
logits' — and wherever the pairing does not hold (the lookup not in the graph, or already run,
or no head read after it) each passes its own part on, the lookup's as the rows it touched (a
sparse gradient, as ``sparse=True``): the sum is the same either way, up to the order of
addition.

Untied, with ``max_norm`` or with ``scale_grad_by_freq``, or with an embedding module whose
forward is its own (Gemma's scales the looked-up rows by √H; the lookup here would replace that
forward and drop it), nothing changes: the lm_head's weight is read as it is
(`gradlens.sources.forward.head_weight`), and autograd sums the two parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.sources.forward import head_weight


class TiedHead:
    """Reads the lm_head's weight for the logit path (``weight()``); ``merged`` counts the
    lookups whose rows went into G_W in place (the others' went on as sparse rows)."""

    def __init__(self, read: Callable[[], Tensor]) -> None:
        self.weight = read
        self.merged = 0


class _Pair:
    """One forward's lookup and the G_W its head read kept for it, by backward (graph task)."""

    def __init__(self, head: TiedHead) -> None:
        self.head = head
        self.node: Any = None  # the lookup's backward node (None without autograd)
        self.gradient: Tensor | None = None  # G_W kept for the lookup, in backward ``task``
        self.task: int | None = None
        self.looked_up: int | None = None  # the backward in which the lookup's ran last


def _task() -> int:
    return int(torch._C._current_graph_task_id())


class _HeadRead(torch.autograd.Function):
    """The identity on E; its backward keeps G_W for the paired lookup when that will run
    later in the same backward, and passes G_W on otherwise."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, pair: _Pair | None) -> Tensor:
        ctx.pair = pair
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        pair, task = ctx.pair, _task()
        if (
            pair is None
            or pair.node is None
            or pair.looked_up == task
            or not torch._C._will_engine_execute_node(pair.node)
        ):
            return grad, None
        if pair.gradient is not None and pair.task == task:  # E read twice after the lookup
            pair.gradient = pair.gradient + grad
        else:
            pair.gradient, pair.task = grad, task
        return None, None


class _Lookup(torch.autograd.Function):
    """``F.embedding(ids, E, padding_idx)``; its backward adds the rows into the kept G_W."""

    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None, pair: _Pair
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.pair, ctx.shape = padding_idx, pair, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None, None]:
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad.reshape(-1, ctx.shape[1])
        if ctx.padding_idx is not None:
            kept = ids != ctx.padding_idx
            ids, rows = ids[kept], rows[kept]
        pair, task = ctx.pair, _task()
        pair.looked_up = task
        dense, pair.gradient = pair.gradient, None
        if dense is not None and pair.task == task:
            pair.head.merged += 1
            return None, dense.index_add_(0, ids, rows.to(dense.dtype)), None, None
        with torch.sparse.check_sparse_tensor_invariants(False):  # indices in range by design
            sparse = torch.sparse_coo_tensor(ids[None], rows, ctx.shape)
        return None, sparse, None, None


@contextmanager
def tied_gradient_in_place(model: Any) -> Iterator[TiedHead]:
    """Inside the block, a tied embedding's gradient goes into the lm_head's in place (module
    docstring). Yields how the logit path reads the lm_head's weight (as
    `gradlens.sources.forward.head_weight` does where nothing changes)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    tied = head is not None and getattr(head, "weight", None) is weight
    # the lookup replaces the module's forward: only where that forward is nn.Embedding's own
    # (Gemma's embedding multiplies the rows by √H after it: a plain lookup would drop that)
    plain = isinstance(emb, nn.Embedding) and type(emb).forward is nn.Embedding.forward
    if not (tied and plain and emb.max_norm is None and not emb.scale_grad_by_freq):
        yield TiedHead(lambda: head_weight(model))
        return

    def read() -> Tensor:
        return head_weight(model, _HeadRead.apply(head.weight, last[0]))

    reader = TiedHead(read)
    last: list[_Pair | None] = [None]  # the pair of the latest lookup, for the next head read

    def lookup(ids: Tensor) -> Tensor:
        pair = _Pair(reader)
        out = _Lookup.apply(ids, emb.weight, emb.padding_idx, pair)
        pair.node = out.grad_fn
        last[0] = pair
        return out

    emb.forward = lookup  # the instance's, over nn.Embedding.forward
    try:
        yield reader
    finally:
        del emb.forward
