"""Tolerances per dtype, each with its reason.

u is the unit roundoff of the dtype in which a quantity is accumulated (float32 for bf16/fp16
operands, whose softmax and gradients gradlens computes in float32).

Zero-sum of the logit gradient. Σ_v G_{t,v} = c_t·(1 − Σ_v π_{t,v}) is zero in exact arithmetic;
the check measures it per token against s_t = |c_t| + max_v |G_{t,v}| (the size of the terms
before they cancel). Its rounding is bounded for the computation gradlens itself runs, the same
on both engines (`gradlens.logits`, `gradlens.summation`), not for a softmax kernel's: torch's
CPU log_softmax adds a row's exponentials in one SIMD accumulator of 8 or 16 lanes, each lane
V/lanes terms in sequence, so its Σπ − 1 grows linearly with V (500·u at V = 262,144 with
repeated logits), and another kernel sums in another order. Per token, in the softmax dtype
(unit roundoff u; float32 for bf16/fp16 operands) with float64 sums (u_w = 2⁻⁵³):

    m = max z (exact);  S = Σ exp(z − m): exponentials in u, float64 sums in a fixed order;
    log π_v = (z_v − m) − fl(log S);  π_v = exp(log π_v).

Exponentials whose argument lies below F = ⌈ln(smallest normal number)⌉ (−87 in float32, −708 in
float64) are taken at e^F (`gradlens.logits.floored_exp`, both engines on the CPU path; the
fused kernels do not floor): each such term of S or of Σ_v π_v is off by less than e^F in
absolute terms, against sums that hold the maximum's own e^0 = 1, so by less than V·e^F < 1e-28
relative in all for V < 2³²: the bound B below leaves it out, and the allowance 2B (B > 1e-15)
covers it many times over.
Write ε = 4u for the error of exp (2 ulp: CUDA's expf; on the CPU torch calls MKL's vector exp
in its high-accuracy mode, or SLEEF's without MKL, both within 1 ulp — MKL's only once
initialised on one thread: `gradlens.vector_math`), H the entropy and L = ⌈log2 V⌉ + 7 the
most additions a term goes through in a chunked pairwise sum (`summation.chunked_depth`,
whatever the chunk size). Then, to first order:

- z_v − m rounds by u·|z_v − m| ≤ u·|log π_v| (because z_v − m = log π_v + log S, log S ≥ 0), so
  S is off by at most u·H + ε + 6L·u_w relative (π-weighted; each chunk merge adds an exp, a
  product and a sum in float64: 6u_w per level), and fl(log S) by that plus u·log S;
- log π_v rounds twice, by at most u·(|z_v − m| + |log π_v|) ≤ 2u·|log π_v|, π-weighted 2u·H,
  and exp adds ε.

So |Σ_v π_v − 1| ≤ u·(3H + log S) + 2ε + (6L + 1)·u_w ≤ u·(4·ln V + 8) + (6L + 1)·u_w, with
H, log S ≤ ln V: no dependence on the size of the logits, the kernel or the chunk size.
Nor on the engine path: the fused engine's kernels write float64 sums of 8 consecutive terms
(any order: 7 additions at most, as `pairwise_sum`'s blocks) that torch adds by halving, and
take exp from CUDA's libdevice (2 ulp); the vocab-parallel engine adds its P ranks' parts (S_r
and T_r; the partial Σπ, Σ_v E_v and Σ_v ∂L/∂W_v) by a compensated sum, or on a grid that makes
the backend's sum exact, so one rounding whatever P, after at most ⌈log2 V_r⌉ + 5 additions on
the rank (`summation`: L keeps two levels spare). The bound is the same for every split.
G = c·(e_y − π) adds 2u (the product and the sampled entry's sum); the check sums G in float64
by `pairwise_sum` (L·u_w·Σ|G| ≤ 2L·u_w·|c|); the streamed check reads c·(1 − Σπ) from the
engine's float64 Σπ (L·u_w). Hence, relative to s_t,

    |Σ_v G_{t,v}| / s_t ≤ B = u·(4·ln V + 10) + (8L + 1)·u_w,

and 2B is allowed. In float32 at V = 262,144 that is 7.1e-6; a z-loss λ·lse² (PaLM's and
OLMo 2's λ = 1e-4) adds 2λ·lse to Σ_v G_t in units of |c_t|, 2.4e-3 at lse = 12.

With the entropy bonus (E_v = w·π_v·(log π_v + H)) the bound adds u·(3·max|z| + 2·ln V + 16):
Σ_v E_v = w·(H_c − H_e) + w·H_c·(Σπ − 1), where H_c is the H that centres E and H_e = −Σπ log π
of the stored entries. The materialized path takes H_c from the same entries (8u in all); the
streamed engine needs H before pass 2 and takes it from pass 1's log S − T/S, which differs
from H_e by at most u·H·(3R + 3·ln V + 25), R = max z − min z ≤ 2·max|z|, against the bonus's
size 2|w|H in s_t.

Zero-sum of ∂L/∂W. Σ_v ∂L/∂W_v = Σ_t (Σ_v G_{t,v})·h_t, at most B·Σ_t s_t‖h_t‖, plus the
rounding of the products. A GEMM accumulates its M tokens in an order of its own (blocked, in
sequence within a block), so its error per entry is bounded by γ_M = M·u times Σ_t |G_tv||h_t|
(any order), and Σ_v |G_tv| ≤ 2s_t: 2·M·u·Σ_t s_t‖h_t‖. The streamed engine adds the sampled
rows to the dense ones (u on each of two terms: 2u, and u more for the entropy block: 3u in
all), and with bf16/fp16 operands rounds π and c⊙h to the operand dtype before its GEMM and the
product after it (3·u_dense); the row sums are float64 `pairwise_sum`s (2L·u_w). So

    ‖Σ_v ∂L/∂W_v‖ ≤ B·Σ_t s_t‖h_t‖ + (2·M·u + 3u + 3·u_dense + 2L·u_w)·Σ_t g_t‖h_t‖,

twice which is allowed, relative to ‖∂L/∂W‖_F. Below the smallest normal number (hidden states
or gradients so small that the products are subnormal) rounding is absolute, not relative: at
most η = half the subnormal spacing (2⁻¹⁵⁰ in float32) per product and per addition, so each
entry of ∂L/∂W is off by at most 2·M·η more, and the row sum's norm by √H·V·2·M·η
(`zero_sum_underflow`; η of the narrowest dtype the products pass through); for any batch whose
numbers are normal this is below 10⁻³⁰. g_t = s_t, except for a streamed loss that
reuses another's dense product (ppo_clip from ppo: D_k = D_j + πᵀ[(c_k − c_j)⊙h] over the
tokens where they differ): its products round at the size of |c_j| + |c_k − c_j|, which on a
clipped token with a large ratio is far above its own s_t = 0. Both bounds come from the data
of the run (V, M, the dtypes, and max|z| with the entropy bonus): they are reported with it.

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

from gradlens import summation

AGREEMENT = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 4 * 2.0**-8,
    torch.float16: 4 * 2.0**-11,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2 of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def chunked_depth(vocab: int) -> int:
    """L = ⌈log2 V⌉ + 7."""
    return summation.chunked_depth(vocab)


def zero_sum_logits(
    accum: torch.dtype, vocab: int, bonus_max_abs_logit: float | None = None
) -> float:
    """Allowed max_t |Σ_v G_{t,v}| / s_t: 2B, with the entropy bonus's term when
    ``bonus_max_abs_logit`` (max|z| of the run) is given."""
    u, uw, ln_v = unit_roundoff(accum), unit_roundoff(summation.WIDE), math.log(max(vocab, 1))
    bound = u * (4 * ln_v + 10) + (8 * chunked_depth(vocab) + 1) * uw
    if bonus_max_abs_logit is not None:
        bound += u * (3 * bonus_max_abs_logit + 2 * ln_v + 16)
    return 2 * bound


def zero_sum_products(
    accum: torch.dtype, vocab: int, tokens: int, dense: torch.dtype | None = None
) -> float:
    """The products' share of the allowed ‖Σ_v ∂L/∂W_v‖, in units of Σ_t g_t‖h_t‖ (g_t: the
    size of what entered the GEMMs, s_t unless a streamed loss reuses another's product);
    ``dense``: the streamed engine's GEMM dtype, when narrower than ``accum``."""
    u, uw = unit_roundoff(accum), unit_roundoff(summation.WIDE)
    products = 2 * max(tokens, 1) * u + 3 * u + 2 * chunked_depth(vocab) * uw
    if dense is not None and unit_roundoff(dense) > u:
        products += 3 * unit_roundoff(dense)
    return 2 * products


def zero_sum_underflow(
    accum: torch.dtype, vocab: int, tokens: int, hidden: int, dense: torch.dtype | None = None
) -> float:
    """The absolute rounding below the normal range that ‖Σ_v ∂L/∂W_v‖ may carry (module
    text): √H·V·2·M·η, η = half the subnormal spacing of the narrowest dtype in the products."""
    eta = max(_half_subnormal_spacing(accum), _half_subnormal_spacing(dense or accum))
    return 2 * math.sqrt(max(hidden, 1)) * vocab * 2 * max(tokens, 1) * eta


def _half_subnormal_spacing(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def zero_sum_weight_factor(
    accum: torch.dtype,
    vocab: int,
    tokens: int,
    dense: torch.dtype | None = None,
    bonus_max_abs_logit: float | None = None,
) -> float:
    """Allowed ‖Σ_v ∂L/∂W_v‖ in units of Σ_t s_t‖h_t‖ when g_t = s_t: 2B plus the products'."""
    return zero_sum_logits(accum, vocab, bonus_max_abs_logit) + zero_sum_products(
        accum, vocab, tokens, dense
    )


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
