"""MKL's vector math, called once on one thread before any computation runs it on several.

On the CPU, torch's exp, log, sqrt, tanh, erf and the other functions listed in `FUNCTIONS`
(float32 and float64) call MKL's vector math library (VML) in its high-accuracy mode (within
1 ulp). When the first of those calls in a process runs on several threads at once, one
thread may compute it with a far less accurate kernel — it looks like a race in the library's
lazy set-up, since every later call is exact. Measured on a 2-core Intel Xeon (AVX-512, AMX;
torch 2.13.0 with its MKL), a matrix product and then exp of a [320, 49152] float32 tensor in a
fresh process: in 15 of 40 processes one thread's half of the rows came out with relative
errors up to 1.5e-4 (float32's unit roundoff: 6e-8), later calls in the same process within
6.2e-8.
gradlens's softmax normaliser (`gradlens.logits`) is such a call: on those processes
Σ_v π_v − 1 was 4e-5, and the zero-sum check failed correct losses at random. With MKL kept to
AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2``) or to one thread, 0 of 12; after one call of exp on 8
numbers (which runs on the calling thread alone), 0 of 40.

`initialise_vector_math` makes that one-thread call for every such function and dtype (8
numbers each, microseconds in all), so that the first multi-threaded call finds the library
initialised. `gradlens.summation` calls it when imported; every computation of gradlens
(compare, sweep, trace, the API) imports that module before it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch's CPU unary functions that call MKL's VML for float32 and float64 (ATen/cpu/vml.h)
FUNCTIONS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    torch.exp,
    torch.log,
    torch.log2,
    torch.log10,
    torch.sqrt,
    torch.tanh,
    torch.erf,
    torch.erfc,
    torch.erfinv,
    torch.sin,
    torch.cos,
    torch.tan,
    torch.asin,
    torch.acos,
    torch.atan,
    torch.trunc,
)
# few enough numbers that torch runs the call on the calling thread (its grain is 2048)
WARM_UP_SIZE = 8


def initialise_vector_math() -> None:
    """Call each of `FUNCTIONS` once per dtype on `WARM_UP_SIZE` numbers in (0, 1), on this
    thread (module docstring)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((WARM_UP_SIZE,), 0.5, dtype=dtype)
        for function in FUNCTIONS:
            function(x)
