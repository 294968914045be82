"""Tolerances per dtype, each with its reason.

u is the unit roundoff of the dtype in which a quantity is accumulated (float32 for bf16/fp16
operands, whose softmax and gradients gradlens computes in float32).

Zero-sum of the logit gradient. Σ_v G_{t,v} = c_t·(1 − Σ_v π_{t,v}) is zero in exact
arithmetic. In floating point, π_v = exp(ℓ_v) inherits the absolute error u·(|z_v| + |lse|) of
ℓ_v, so Σ π deviates from 1 by at most about u·(1 + 2·max|z|); the pairwise summation over V
terms adds at most log2(V)·u·Σ_v|G_v|. Per token, measured against s_t = |c_t| + max_v|G_{t,v}|
(the size of the terms before they cancel), the bound is u·(1 + 2·max|z| + 2·log2 V); we allow
twice that.

Zero-sum of ∂L/∂W. Σ_v ∂L/∂W_v = Σ_t (Σ_v G_{t,v})·h_t plus the rounding of the products and
sums, bounded by u·(1 + 2·max|z| + 2·log2 M + 2·log2 V + 4)·Σ_t s_t‖h_t‖; we allow twice that,
relative to ‖∂L/∂W‖_F. Both bounds come from the data of the run: they are reported with it.

Closed form vs autograd. The two paths evaluate the same formula in different orders, so they
agree to a small multiple of u times the conditioning of the sums. float64: 1e-9 (about 4·10^6
u; nothing near it is ever seen, anything above it is a formula error). float32: 1e-4 (about
840 u: the sums run over up to M·V terms with pairwise accumulation). bf16 operands: autograd
rounds G to bf16 before the GEMM and ∂L/∂W to bf16 after it, two roundings of u_bf16 = 2⁻⁸ =
3.9e-3 each, so 4·u_bf16 = 1.6e-2.

Split invariance. A trainer that cuts the step into K = dp·ga micro-batches forms the same
gradient as K partial gradients summed (and the ranks averaged) in its accumulation dtype
(float32 for bf16/fp16/float32 operands, whose gradients accumulate in float32; float64 for
float64), each with a normaliser computed in that dtype. Recursive summation of K terms is off
by at most (K − 1)·u relative to the sum of their magnitudes, the normaliser's division and the
scale's multiplication add 2·u: a split-invariant convention can differ from the full batch by
(K + 1)·u through rounding alone; we allow twice that. Anything above is the split itself.
"""

from __future__ import annotations

import math

import torch

AGREEMENT = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 4 * 2.0**-8,
    torch.float16: 4 * 2.0**-11,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2 of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def zero_sum_logits(accum: torch.dtype, vocab: int, max_abs_logit: float) -> float:
    """Allowed max_t |Σ_v G_{t,v}| / s_t."""
    return 2 * unit_roundoff(accum) * (1 + 2 * max_abs_logit + 2 * math.log2(vocab))


def zero_sum_weight_factor(
    accum: torch.dtype, vocab: int, tokens: int, max_abs_logit: float
) -> float:
    """Allowed ‖Σ_v ∂L/∂W_v‖ in units of Σ_t s_t‖h_t‖."""
    log_terms = 2 * math.log2(max(tokens, 1)) + 2 * math.log2(vocab) + 4
    return 2 * unit_roundoff(accum) * (1 + 2 * max_abs_logit + log_terms)


def agreement(operand: torch.dtype) -> float:
    """Allowed normwise relative difference between the closed form and autograd."""
    return AGREEMENT[operand]


def split(operand: torch.dtype, parts: int) -> float:
    """Allowed ‖G_split − G_full‖ / ‖G_full‖ for a step cut into ``parts`` = dp·ga
    micro-batches."""
    accum = torch.float64 if operand == torch.float64 else torch.float32
    return 2 * (parts + 1) * unit_roundoff(accum)


def split_reason(operand: torch.dtype, parts: int) -> str:
    """`split`'s derivation, for the report."""
    accum = "float64" if operand == torch.float64 else "float32"
    return (
        f"2·(K + 1)·u with K = dp·ga = {parts} partial gradients summed in {accum} "
        f"(u = {unit_roundoff(torch.float64 if accum == 'float64' else torch.float32):.3g}): "
        "the rounding a trainer adds by accumulating K micro-batches and computing their "
        "normalisers, twice"
    )
