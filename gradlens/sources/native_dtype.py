"""What a device computes natively: the lower precisions worth choosing on it.

A CPU without bfloat16 instructions emulates bf16 arithmetic (each operand widened to float32,
each result rounded back), which costs more than float32 itself; with them (AVX512-BF16, AMX,
Arm BF16) a bf16 matrix product runs at about twice the float32 rate (on the 2-core development
machine, AMD EPYC with AVX512-BF16: a [504 × 576]·[576 × 1536] product took 2.4 ms in bf16
against 5.7 ms in float32). So ``auto`` settings choose bf16 only where `native_bf16` holds:
``source.rollout_dtype`` (gradlens.sources.rollout) and ``source.stale.grad_dtype``
(gradlens.sources.staleness).
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """The device computes bfloat16 natively: CUDA with bf16 support, or a CPU with the
    AVX512-BF16 or AMX-BF16 instructions (x86) or BF16 (Arm)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch cannot tell: the safe choice is float32
        return False
    caps = capabilities()
    return any(bool(caps.get(k)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
