"""The gradient sink: a tied embedding's gradient as rows (sparse) gives the norms the dense
[V, H] gradient gives, in one piece or summed over micro-batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlens.compare.gradient_norms import GradientSink, square_sum

V, H = 50, 6


def lookup_gradient(ids: torch.Tensor, upstream: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The embedding's gradient of Σ upstream·E[ids], by autograd, dense or as rows."""
    emb = nn.Embedding(V, H, sparse=sparse).double()
    (emb(ids) * upstream).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse is sparse
    return emb.weight.grad


def sink_squares(parts: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor) -> dict:
    """Feed a tied pair (head gradient, embedding gradient) per micro-batch; the last is final."""
    emb = nn.Parameter(torch.zeros(V, H, dtype=torch.float64))
    head = torch.zeros(V, H, dtype=torch.float64)
    sink = GradientSink(emb, head, True, torch.unique(ids))
    for i, (g_head, g_emb) in enumerate(parts):
        final = i == len(parts) - 1
        sink.receive("sft", emb, g_emb, final)
        sink.receive("sft", head, g_head, final)
    sink.flush()
    squares = sink.squares["sft"]
    return {"emb": squares[id(emb)], "head": squares[id(head)], "tied": squares["tied"]}


def test_square_sum_of_rows_named_twice_adds_them_first():
    ids = torch.tensor([3, 7, 3, 3, 0])  # row 3 three times
    up = torch.randn(5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense, rows = lookup_gradient(ids, up, False), lookup_gradient(ids, up, True)
    assert not rows.is_coalesced()
    assert square_sum(rows) == pytest.approx(float(dense.pow(2).sum()), rel=1e-14)
    # squaring each looked-up row apart would be another (wrong) number
    assert square_sum(rows._values()) != pytest.approx(float(dense.pow(2).sum()), rel=1e-3)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_tied_pair_with_row_gradients_equals_the_dense_one(micro_batches):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (micro_batches, 8), generator=gen)
    parts_dense, parts_rows = [], []
    for b in range(micro_batches):
        up = torch.randn(8, H, dtype=torch.float64, generator=gen)
        g_head = torch.randn(V, H, dtype=torch.float64, generator=gen)
        parts_dense.append((g_head, lookup_gradient(ids[b], up, False)))
        parts_rows.append((g_head.clone(), lookup_gradient(ids[b], up, True)))
    # the reference: the trainer's one tensor, both paths summed (before the sink, which
    # sums micro-batches into the first one's tensors in place, as it may with autograd's)
    total_head = sum(p[0] for p in parts_dense)
    total_emb = sum(p[1] for p in parts_dense)
    expected = float((total_head + total_emb).pow(2).sum())
    dense = sink_squares(parts_dense, ids)
    rows = sink_squares(parts_rows, ids)
    assert dense["tied"] == pytest.approx(expected, rel=1e-13)
    for key in ("emb", "head", "tied"):
        assert rows[key] == pytest.approx(dense[key], rel=1e-13), key


@pytest.mark.parametrize("sparse", [False, True])
def test_an_embedding_gradient_off_the_input_rows_is_refused(sparse):
    ids = torch.tensor([1, 2, 5])
    up = torch.ones(3, H, dtype=torch.float64)
    g_emb = lookup_gradient(ids, up, sparse)
    emb = nn.Parameter(torch.zeros(V, H, dtype=torch.float64))
    head = torch.zeros(V, H, dtype=torch.float64)
    sink = GradientSink(emb, head, True, torch.tensor([1, 2]))  # R lacks row 5
    with pytest.raises(AssertionError, match="rows off R"):
        sink.receive("sft", emb, g_emb, True)
