"""A transformer block's call, as the code that wraps a block sees it.

transformers hands a block its hidden states x first — as the first positional argument, or
as ``hidden_states`` — with the other arguments beside it (position embeddings, an attention
mask, a cache), and the block returns the new hidden states, alone or as the first entry of a
tuple. The wrappers of `gradlens.sources.blockwise` (the cut at the blocks) and
`gradlens.sources.autocast_recompute` (the lower-precision recomputation) read and replace x
in a call and in an output through these functions.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """x of a block's call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with x replaced, where the call had it."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def other_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keyword arguments besides x (its positional ones besides x: ``args[1:]``)."""
    return {k: v for k, v in kwargs.items() if k != "hidden_states"}


def hidden_out(out: Any) -> Tensor:
    """The hidden states a block returned."""
    return out if isinstance(out, Tensor) else out[0]


def replace_out(out: Any, x: Tensor) -> Any:
    """A block's output with its hidden states replaced by x, the rest as it was."""
    return x if isinstance(out, Tensor) else (x, *out[1:])


def depends_on_parameters(values: Any) -> bool:
    """Some tensor in ``values`` (a tuple, list or dict, looked into all the way down)
    requires grad: it was computed from a parameter (or is one)."""
    items = values.values() if isinstance(values, dict) else values
    for v in items:
        if isinstance(v, Tensor) and v.requires_grad:
            return True
        if isinstance(v, (tuple, list, dict)) and depends_on_parameters(v):
            return True
    return False
