"""The forward primitives of a causal LM: positions, the lm_head weight, final hidden states.

The lm_head analysis needs z = W·h: the final hidden state h_t (after the final norm) whose
logits predict token t + 1, and the lm_head weight W. With a bias on the lm_head, h is
extended by a constant 1 and W by the bias column, so z = W h still holds and the bias gradient
is the last column of ∂L/∂W. A temperature T is folded into the hidden states (h/T), so the
lm_head gradient keeps its 1/T factor. `check_logit_path` refuses a model whose logits are not
W·h (soft-capping, scaling).

Activation checkpointing (`checkpointed_blocks`): inside the block, each transformer block
keeps only its input for the backward and recomputes its forward there (torch.utils.checkpoint,
non-reentrant), so a forward with autograd holds L·H numbers per position and block instead of
all of the block's intermediates — one more forward's worth of compute for the backward. That
recomputation can run in a lower precision than the forward
(`gradlens.sources.autocast_recompute`): the stale steps' backward in bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gradlens.containers import LoadedModel, Sequences
from gradlens.errors import GradlensError
from gradlens.logits import compute_logits
from gradlens.sources.autocast_recompute import autocast_recomputed, lowerable
from gradlens.sources.shared_prefix import packed_hidden, prefix_layout


def position_ids(attention_mask: Tensor) -> Tensor:
    """[N, L] positions that count real tokens only, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(module path, modules) of the list of transformer blocks, if one is found."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (layers is None or len(module) == layers):
            return name, module
    return None


@contextmanager
def replaced_forwards(
    blocks: Sequence[nn.Module], wrap: Callable[[int, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Inside the block, block i's ``forward`` is ``wrap(i, its forward)``. Afterwards each
    block gets back the attribute it had: its class's method, or the function a hook library
    (accelerate's device placement) had set on the instance."""
    own = [vars(block).get("forward") for block in blocks]
    for i, block in enumerate(blocks):
        block.forward = wrap(i, block.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block, previous in zip(blocks, own, strict=True):
            if previous is None:
                del block.forward
            else:
                block.forward = previous  # type: ignore[method-assign]


@contextmanager
def checkpointed_blocks(
    model: nn.Module, recompute_dtype: torch.dtype | None = None
) -> Iterator[bool]:
    """Recompute every transformer block in the backward (see the module docstring); with
    ``recompute_dtype`` (lower than the model's), the recomputation runs under autocast in it
    (`gradlens.sources.autocast_recompute`: the forward stays exact, the backward's products
    are in that dtype), for every block whose gradient flows in through its hidden states alone.

    Yields whether blocks were found (a model without a block list runs unchanged). The
    model must be deterministic in its forward (eval mode: no dropout), which every caller's
    model is.
    """
    blocks = block_list(model)
    if blocks is None:
        yield False
        return

    def wrap(_: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            if recompute_dtype is not None and lowerable(args, kwargs):
                return autocast_recomputed(original, args, kwargs, recompute_dtype)
            return checkpoint(original, *args, use_reentrant=False, **kwargs)

        return forward

    with replaced_forwards(list(blocks[1]), wrap):
        yield True


@contextmanager
def row_gradient_embedding(model: Any) -> Iterator[bool]:
    """Inside the block, the input embedding's gradient is the rows it looked up
    (``nn.Embedding.sparse``) when its weight is the lm_head's (tied embeddings).

    For a reader that takes the lookup's gradient apart from the lm_head's dense
    ∂L/∂W = Σ_t G_t h_tᵀ (the whole-model gradients' `GradientSink`), it is then never widened to
    [V, H]. Where autograd sums the two for the one tensor W, torch adds a sparse gradient into a
    dense one out of place (a copy of the dense one with the rows added): the stale steps merge
    the rows in place instead (`gradlens.sources.tied_gradient`). Untied, the embedding's own
    gradient would stay sparse, which an optimizer of dense tensors does not take: nothing
    changes then. Yields whether it applies.
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    if not (isinstance(emb, nn.Embedding) and tied) or emb.sparse:
        yield False
        return
    emb.sparse = True
    try:
        yield True
    finally:
        emb.sparse = False


def grid_with(full: Tensor, rows: list[int], part: Tensor) -> Tensor:
    """[N, T] ``full``, detached, with its rows ``rows`` replaced by ``part`` [n, T] (which
    keeps its graph): the whole batch's values, differentiable in one micro-batch."""
    index = torch.tensor(rows, device=full.device)
    return full.detach().index_copy(0, index, part.to(full.dtype))


def head_weight(model: Any, weight: Tensor | None = None) -> Tensor:
    """[V, H] lm_head weight, or [V, H + 1] with the bias as the last column; ``weight``: the
    lm_head's weight as the caller reads it (a differentiable view of it), None: the weight."""
    head = model.get_output_embeddings()
    weight = head.weight if weight is None else weight
    bias = getattr(head, "bias", None)
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def final_hidden(model: Any, seqs: Sequences, temperature: float, bias: bool) -> Tensor:
    """[N, T, H(+1)] h_t/T: final hidden states (after the final norm) that predict token t+1;
    through the packed layout of `gradlens.sources.shared_prefix` when ``seqs`` share prefixes
    and it saves positions."""
    base = model.base_model
    layout = prefix_layout(seqs) if seqs.share_prefix else None
    if layout is not None:
        h = packed_hidden(base, seqs, layout)[:, :-1]  # [N, T, H]
    else:
        h = base(
            input_ids=seqs.input_ids,
            attention_mask=seqs.attention_mask,
            position_ids=seqs.position_ids,
            use_cache=False,
        ).last_hidden_state[:, :-1]  # [N, T, H]
    h = h / temperature if temperature != 1.0 else h
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)  # [N, T, H + 1]
    return h


# Relative difference allowed between the model's own logits and W·h: the two compute the same
# product, through the same kernels up to the order of operations; a model with logit
# soft-capping or scaling is off by far more (tens of per cent).
LOGIT_PATH_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
LOGIT_PATH_TOLERANCE_LOW = 3e-2  # bf16/fp16: a few roundings of 2^-8


@torch.no_grad()
def check_logit_path(
    loaded: LoadedModel, prompt: list[int], device: torch.device, key: str = "source.path"
) -> None:
    """The model's logits must be lm_head(final hidden state): z = W h (+ b)."""
    model = loaded.model
    ids = torch.tensor([prompt], device=device)  # [1, P]
    seqs = Sequences(
        ids,
        torch.ones_like(ids),
        torch.arange(ids.shape[1], device=device)[None],
        torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=device),
    )
    weight = head_weight(model)
    ours = compute_logits(final_hidden(model, seqs, 1.0, loaded.bias), weight)  # [1, P-1, V]
    theirs = model(input_ids=ids, use_cache=False).logits[:, :-1].to(ours.dtype)
    err = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))
    tol = LOGIT_PATH_TOLERANCE.get(weight.dtype, LOGIT_PATH_TOLERANCE_LOW)
    if not err <= tol:
        raise GradlensError(
            f"{key}: this model's logits are not lm_head(final hidden state) (relative "
            f"difference {err:.3g} > {tol:g}; logit soft-capping or scaling?): gradlens's lm_head "
            "analysis needs z = W·h"
        )
