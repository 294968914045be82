"""A backward through a causal LM one transformer block at a time, shared by several losses.

K losses of one forward need K backward passes (each loss has its own cotangent, and the
gradients are reported per loss). Through a graph of the whole model, the forward keeps every
block's intermediates until the last backward: for a 135M-parameter model and 16 sequences of
48 positions, 1.25 GB. Activation checkpointing keeps only each block's input, but
``torch.utils.checkpoint`` recomputes a block in every backward that reaches it: K more
forwards. Here the model is cut at its blocks B_1 … B_n instead:

    x_0 = entry(ids)  →  x_i = B_i(x_{i−1})  →  h = tail(x_n)  →  the losses L_1 … L_K

1. The taped forward (`taped_blocks`): autograd is on, but every block runs without it and
   records its inputs (x_{i−1} and its other arguments: position embeddings, masks); the last
   block's output becomes a leaf x̂_n. The graph holds only the entry (the embedding lookup)
   and the tail (the final norm, the logit path), and the tape n·L·H numbers per sequence.
2. The losses' backward to the tail: for each loss k, the cotangent g_k = ∂L_k/∂x_n and the
   tail's parameter gradients, through the one retained tail graph.
3. For i = n … 1 (`backward_blocks`): B_i is recomputed once from its recorded input, with
   autograd, and each loss's cotangent is pulled through it,

       (∂L_k/∂x_{i−1}, ∂L_k/∂θ_i) = vjp(B_i, x_{i−1}; g_k),   g_k ← ∂L_k/∂x_{i−1},

   so every block is recomputed once for all K losses, and only one block's intermediates
   exist at a time. Each block's parameter gradients for loss k are handed over as soon as they
   are complete (they belong to that block alone).
4. The entry: g_k pulled through the entry graph gives the embedding's gradients.

Compute: one forward, one recomputation, K backward passes — one forward more than with the
whole graph kept, for about 1/n of its activation memory (one block's intermediates at a time,
plus the tape).

A forward without autograd can record the tape as well (the stale steps' last forward at θ_N
does, for the model source). A later forward of the same sequences at the same parameters then
replays it (`replayed_blocks`): each block hands on its recorded output instead of computing
it, only the entry and the tail run (with autograd), and step 1 costs no forward of the
blocks. Whether it is the same forward is checked, not assumed: no parameter may have been
written since the recording (each parameter's storage and version counter), and the first
block's arguments must equal the recorded ones (the others follow from them and the
parameters).

The blocks must be deterministic (eval mode, no dropout) so that the recomputation equals the
taped forward, and the cut must be clean, or `BlockwiseUnsupported` is raised (and the caller
keeps the whole graph): no parameter shared by two blocks or by a block and the rest, no block
argument besides x_{i−1} that depends on a parameter, no key-value cache (whose state a
recomputation would change), and each block's input the very tensor the block before it
returned (nothing computed between two blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.containers import BlockTape
from gradlens.sources.block_call import (
    depends_on_parameters,
    hidden_in,
    hidden_out,
    other_keywords,
    replace_out,
    with_hidden,
)
from gradlens.sources.forward import block_list, replaced_forwards

# the names transformers blocks take a key-value cache by: a recomputation would append to it
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class BlockwiseUnsupported(Exception):
    """The model cannot be cut at its blocks (see the module docstring)."""


def parameter_state(model: nn.Module) -> list[tuple[int, int]]:
    """(storage address, version counter) of each parameter: any write since changes one."""
    return [(p.data_ptr(), p._version) for p in model.parameters()]


def check_cut(model: nn.Module) -> list[nn.Module]:
    """The blocks, if the model can be cut at them: no parameter in two blocks or in a block
    and elsewhere. Raises `BlockwiseUnsupported` otherwise."""
    found = block_list(model)
    if found is None:
        raise BlockwiseUnsupported("no list of transformer blocks")
    prefix, blocks = found
    owner: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        inside = name.startswith(prefix + ".")
        where = name[len(prefix) + 1 :].split(".")[0] if inside else "outside"
        if owner.setdefault(id(p), where) != where:
            raise BlockwiseUnsupported(f"parameter {name} is shared across the cut")
    return list(blocks)


@contextmanager
def taped_blocks(model: nn.Module) -> Iterator[BlockTape]:
    """Step 1 of the module docstring, for every forward inside the block (one forward)."""
    tape = BlockTape(check_cut(model), parameters=parameter_state(model))
    last = len(tape.blocks) - 1
    handed: list[Tensor | None] = [None]  # the hidden state the last block handed on

    def wrap(i: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            others = other_keywords(kwargs)
            if depends_on_parameters(args[1:]) or depends_on_parameters(others):
                raise BlockwiseUnsupported("a block argument besides x depends on a parameter")
            if any(others.get(name) is not None for name in CACHE_ARGUMENTS):
                raise BlockwiseUnsupported("a block receives a key-value cache (its state changes)")
            x = hidden_in(args, kwargs)
            if i == 0:
                tape.entry = x
            elif x is not handed[0]:  # an operation between two blocks: not cut at the blocks
                raise BlockwiseUnsupported("the model changes the hidden state between blocks")
            call_args, call_kwargs = with_hidden(args, kwargs, x.detach())
            tape.inputs.append((call_args, call_kwargs))
            with torch.no_grad():
                out = original(*call_args, **call_kwargs)
            if i == last:
                tape.exit = hidden_out(out).detach().requires_grad_(torch.is_grad_enabled())
                out = replace_out(out, tape.exit)
            else:
                handed[0] = hidden_out(out)
            tape.outputs.append(out)
            return out

        return forward

    with replaced_forwards(tape.blocks, wrap):
        yield tape


def _same(a: Any, b: Any) -> bool:
    """Equal block arguments: tensors by shape, dtype and value, containers entry by entry."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach(), b.detach()))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # no single truth value: not known equal
        return False


@contextmanager
def replayed_blocks(model: nn.Module, recorded: BlockTape) -> Iterator[BlockTape]:
    """Step 1 of the module docstring without running the blocks: a forward of the same
    sequences at the same parameters as ``recorded``'s hands on the recorded outputs. The entry
    (the embedding) and the tail run as usual, with autograd when it is on; the tape yielded
    has this forward's entry and a new leaf for x̂_n, and the recorded inputs, for
    `backward_blocks`. Raises `BlockwiseUnsupported` when the forward is not the recorded one:
    a parameter written since the recording, or the first block called with other arguments
    (the inputs of the others follow from it and the same parameters)."""
    blocks = check_cut(model)
    if len(blocks) != len(recorded.blocks) or any(
        a is not b for a, b in zip(blocks, recorded.blocks, strict=True)
    ):
        raise BlockwiseUnsupported("the recording is of another model")
    if parameter_state(model) != recorded.parameters or recorded.exit is None:
        raise BlockwiseUnsupported("a parameter has been written since the recording")
    tape = BlockTape(blocks, recorded.inputs, recorded.outputs, parameters=recorded.parameters)
    last = len(blocks) - 1

    def wrap(i: int, _: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if i == 0:
                x = hidden_in(args, kwargs)
                call = with_hidden(args, kwargs, x.detach())
                if not _same(call, recorded.inputs[0]):
                    raise BlockwiseUnsupported("the forward is not the recorded one")
                tape.entry = x
            if i == last:
                assert recorded.exit is not None
                tape.exit = recorded.exit.detach().requires_grad_(torch.is_grad_enabled())
                return replace_out(recorded.outputs[i], tape.exit)
            return recorded.outputs[i]

        return forward

    with replaced_forwards(blocks, wrap):
        yield tape


def backward_blocks(
    tape: BlockTape,
    cotangents: list[Tensor],
    receive: Callable[[int, nn.Parameter, Tensor], None],
) -> list[Tensor]:
    """Step 3 of the module docstring: the cotangents at x_n pulled back to x_0, each block
    recomputed once; ``receive(k, parameter, gradient)`` gets every block parameter's gradient
    for loss k. Returns the cotangents at x_0."""
    grads = list(cotangents)
    for block, (args, kwargs) in zip(reversed(tape.blocks), reversed(tape.inputs), strict=True):
        params = [p for p in block.parameters() if p.requires_grad]
        with torch.enable_grad():
            x = hidden_in(args, kwargs).detach().requires_grad_(True)
            call_args, call_kwargs = with_hidden(args, kwargs, x)
            out = hidden_out(block(*call_args, **call_kwargs))
        for k, g in enumerate(grads):
            result = torch.autograd.grad(
                out, [x, *params], grad_outputs=g, retain_graph=k < len(grads) - 1,
                allow_unused=True,
            )  # fmt: skip
            grads[k] = torch.zeros_like(x) if result[0] is None else result[0]
            for p, gp in zip(params, result[1:], strict=True):
                if gp is not None:
                    receive(k, p, gp)
        del out, x
    return grads
