"""The CPU kernels every test process computes with, on any x86 machine.

The golden reports of the model source (``tests/golden``) sample completions from a model and
train it for a few steps: their numbers depend on the last bits of every product, which
depend on the kernels the CPU's instruction set selects — ATen's vectorised loops (AVX2 or
AVX-512), MKL's GEMM blocking, and oneDNN's bf16 products (native on AVX512-BF16, emulated in
float32 elsewhere). A bf16 rollout recorded on one CPU samples other tokens on the other. So
the tests pin the AVX2 variants, which every x86 CPU of the last decade has: ATen's through
``ATEN_CPU_CAPABILITY``, MKL's through conditional numerical reproducibility (``MKL_CBWR``,
strict: the same bits whatever the memory alignment) and oneDNN's through its ISA cap. Each
library reads its variable at its first computation, so `pin` must run before any tensor
operation; a variable already set by the caller is left as it is.
"""

from __future__ import annotations

import os

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin() -> None:
    """Set the variables of `PINS` that the environment does not set already."""
    for name, value in PINS.items():
        os.environ.setdefault(name, value)
