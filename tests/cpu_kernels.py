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

The pins do not make every CPU compute the same bits: on a CPU of another vendor, or with other
bf16 instructions, the model source's golden reports still moved (a Xeon with AMX against the
AMD EPYC with AVX512-BF16 they were recorded on: the rollout's mismatch statistics by up to 9%,
float32 sums that cancel by up to 3e-4 of themselves; the sampled tokens stayed the same).
`platform` names what the pins leave apart, and ``tests/golden/platforms/<platform>`` holds the
reports of the cases bound to it (``tests/golden/cases.py``, ``PLATFORM_BOUND``), with the
`kernel_probe` of the CPU that recorded them: two CPUs of one name whose kernels still round
differently (another generation, other cache sizes) tell apart by it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin() -> None:
    """Set the variables of `PINS` that the environment does not set already."""
    for name, value in PINS.items():
        os.environ.setdefault(name, value)


def pinned() -> bool:
    """This process computes with the pinned kernels of `PINS` (CI's configuration), not with
    others a caller set."""
    return all(os.environ.get(name) == value for name, value in PINS.items())


def own_kernels_env() -> dict[str, str]:
    """This process's environment without the pins, and set to the CPU's own kernels: ATen's
    widest vector loops (AVX-512 where the CPU has it), MKL's and oneDNN's native paths — what
    a user's run computes with."""
    unpinned = {k: v for k, v in os.environ.items() if k not in PINS}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=unpinned,
        capture_output=True,
        text=True,
        check=True,
    )
    native = probe.stdout.strip().lower()
    return {
        **unpinned,
        "ATEN_CPU_CAPABILITY": native,
        "MKL_CBWR": "AUTO",
        "ONEDNN_MAX_CPU_ISA": "ALL",
    }


def platform() -> str:
    """The CPU's vendor and bf16 instructions, e.g. ``AuthenticAMD-avx512_bf16`` or
    ``GenuineIntel-amx_bf16``: the differences between CPUs that the pins leave."""
    import torch  # after `pin`: importing computes nothing

    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    caps = torch.cpu.get_capabilities()
    bf16 = next((k for k in ("amx_bf16", "avx512_bf16") if caps.get(k)), "no_bf16")
    return f"{vendor}-{bf16}"


def kernel_probe() -> str:
    """A digest of the bits of a few products and an attention, in float32 and bf16, on
    seeded operands of the built-in model's sizes: the operations whose last bits the model
    source's reports carry. Equal digests do not prove equal kernels everywhere, but a
    different digest proves the rounding differs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 256, generator=gen)
    w1 = torch.randn(256, 512, generator=gen) / 16
    w2 = torch.randn(512, 2048, generator=gen) / 22
    q, k, v = (torch.randn(2, 4, 48, 64, generator=gen) for _ in range(3))
    digest = hashlib.sha256()
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.nn.functional.silu(x.to(dtype) @ w1.to(dtype)) @ w2.to(dtype)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True
        )
        for out in (y, a):
            digest.update(out.float().numpy().tobytes())
    return digest.hexdigest()[:16]
