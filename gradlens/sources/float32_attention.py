"""Attention in float32 inside a lower-precision recomputation on the CPU.

Under ``torch.autocast`` the products of a transformer block run in bfloat16, and so does
PyTorch's ``scaled_dot_product_attention``: autocast casts its query, key and value to bfloat16.
On the CPU that attention's bfloat16 backward is about twice as slow as its float32
one (at the benchmark's shapes, 4 packed rows of 126 positions with 9 heads of 64 under a
boolean mask: 9.5 ms against 4.9 ms for the backward including the casts, on the 2-core
development machine), so there the recomputation of the stale steps
(`gradlens.sources.autocast_recompute`) runs it as

    o = fl_d( attention( float32(fl_d(q)), float32(fl_d(k)), float32(fl_d(v)) ) )

on the same bf16-rounded q, k and v that autocast hands its bf16 attention (q and k often arrive
in float32 from a rotary embedding computed in float32; autocast rounds them to d).
What changes is only inside attention: the softmax probabilities are not rounded to bf16 before
they multiply v, so o is, if anything, nearer the float32 block's. The output is rounded to d,
as autocast's attention returns it, so everything after it is the autocast block's as before.
On a GPU the bf16 kernels are the fast ones, and nothing is changed there
(`attention_in_float32` is a no-op).

It is a `torch.overrides.TorchFunctionMode`: while it is active, a call of
``torch.nn.functional.scaled_dot_product_attention`` with lower-precision floating inputs on the
CPU that would run in a lower precision d (autocast's dtype when autocast is on, else the
operands' own) runs as above, with autocast off for that call (autocast would cast the operands
back to d); every other call passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

OPERANDS = ("query", "key", "value")  # the attention's first three arguments, by name


class _Float32Attention(TorchFunctionMode):
    """CPU ``scaled_dot_product_attention`` in a lower precision d, computed in float32 on
    operands rounded to d."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        positional = args[:3]
        named = OPERANDS[len(positional) :]
        operands = [*positional, *(kwargs[name] for name in named)]
        low = attention_dtype(operands)
        if low is None:
            return func(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in named}
        mask = kwargs.get("attn_mask")
        if isinstance(mask, Tensor) and mask.dtype.is_floating_point:
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            out = func(*(t.to(low).float() for t in operands), *args[3:], **kwargs)
        return out.to(low)


def attention_dtype(operands: list[Any]) -> torch.dtype | None:
    """The dtype d the attention of these operands would run in, when it is narrower than
    float32 and on the CPU: autocast's when it is on there (it casts all three to d, and q, k
    often arrive in float32 from a rotary embedding computed in float32), else the narrowest
    of the operands' own; None otherwise (nothing to change), and for float64 operands, which
    autocast does not lower."""
    if not all(isinstance(t, Tensor) and t.device.type == "cpu" for t in operands):
        return None
    if not all(t.dtype.is_floating_point and t.dtype != torch.float64 for t in operands):
        return None  # autocast leaves float64 alone, and so does this
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    else:
        dtype = min((t.dtype for t in operands), key=lambda d: torch.finfo(d).bits)
    return dtype if torch.finfo(dtype).bits < 32 else None


@contextmanager
def attention_in_float32(device: torch.device) -> Iterator[None]:
    """Inside the block, the CPU's lower-precision attention runs in float32 (module
    docstring); on another device, nothing changes."""
    with _Float32Attention() if device.type == "cpu" else nullcontext():
        yield
