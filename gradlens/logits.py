"""The logit path every stage shares, so that each computes π_θ bit-for-bit the same way.

z_t = W h_t is computed in the operand dtype (a bf16 GEMM accumulates in fp32 and rounds its
output to bf16, as a trainer's lm_head does); the softmax and everything after it run in
float32, or float64 when the operands are float64.

The probabilities gradlens builds its gradients from are normalised here, not by the softmax
kernel, so that Σ_v π_v − 1 has a bound that holds on every device and for any chunking of the
vocabulary (docs: gradlens.diagnostics.tolerances). Per token, in the softmax dtype d:

    m = max_v z_v                        exact
    S = Σ_v exp(z_v − m)                 exponentials in d, summed in float64 in a fixed order
                                         (`gradlens.summation`); two chunks merge as
                                         (m, S_a·e^{m_a − m} + S_b·e^{m_b − m})
    log π_v = (z_v − m) − fl_d(log S)    two roundings in d
    π_v = exp(log π_v)

With the entropy bonus the normaliser also keeps T = Σ_v exp(z_v − m)·(z_v − m), merged as
T_a e^{m_a−m} + (m_a − m) S_a e^{m_a−m} + (the same for b), so that H = log S − T/S.

Exponentials of arguments below `exp_floor` (ln of the dtype's smallest normal number: −87 in
float32) are taken at the floor (`floored_exp`): exp there returns a subnormal number or 0, and
x86's vectorised exp computes those about ten times slower than the rest (a peaked softmax has a
third of its entries there). Each such term is then e^floor (1.7e-38 in float32) instead of
less: against a sum that holds e^0 = 1 (the maximum's term), V·e^floor < 1e-28 for any V below
2³², far below every rounding bound that involves it (gradlens.diagnostics.tolerances). A −inf
argument (a replayed kept set's excluded entry) must stay an exact 0: callers that have one mask
it after the exponential.

`token_logp`, the sampled token's log-prob the losses see, is torch's log_softmax, as a trainer
computes it (the model source differentiates the same function); it differs from the log π
above by the kernel's rounding of its own sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.summation import WIDE, compensated_sum, pairwise_sum


def softmax_dtype(operand: torch.dtype) -> torch.dtype:
    """float64 operands keep float64; anything narrower is upcast to float32."""
    return torch.float64 if operand == torch.float64 else torch.float32


def compute_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """[..., H] × [V, H] → [..., V] logits in the softmax dtype."""
    return (hidden @ weight.T).to(softmax_dtype(weight.dtype))


def exp_floor(dtype: torch.dtype) -> float:
    """⌈ln(smallest normal number of ``dtype``)⌉: −87 for float32, −708 for float64; exp of
    anything above it is a normal number."""
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def floored_exp(x: Tensor, out: Tensor | None = None) -> Tensor:
    """exp(max(x, `exp_floor`)) (module docstring), into ``out`` when given (it may be ``x``)."""
    y = torch.clamp(x, min=exp_floor(x.dtype), out=out)
    return y.exp_()


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """[..., V], [...] → [...] log π(y) = z_y − logsumexp(z)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Normaliser:
    """The softmax normaliser of M tokens' logits, [M] each.

    Attributes:
        max: m = max_v z_v, in the softmax dtype.
        sum: S = Σ_v exp(z_v − m), float64.
        tilt: T = Σ_v exp(z_v − m)·(z_v − m), float64; None when not asked for.
    """

    max: Tensor
    sum: Tensor
    tilt: Tensor | None = None

    def log_sum(self) -> Tensor:
        """fl(log S), rounded to the softmax dtype."""
        return self.sum.log().to(self.max.dtype)

    def lse(self) -> Tensor:
        """logsumexp_v z_v = m + log S, in the softmax dtype."""
        return (self.max.to(WIDE) + self.sum.log()).to(self.max.dtype)

    def entropy(self) -> Tensor:
        """H = −Σ_v π_v log π_v = log S − T/S, float64 (needs ``tilt``)."""
        assert self.tilt is not None
        return self.sum.log() - self.tilt / self.sum


def normaliser(
    logits: Tensor, tilt: bool = False, top: Tensor | None = None, restricted: bool = True
) -> Normaliser:
    """The normaliser of one chunk of logits [M, V_c] (all of them, or a vocabulary chunk);
    ``top``: its max_v z_v [M] when the caller has it already. ``restricted``: the logits may
    hold −inf (a replayed kept set), whose exponentials are made exact zeros; False: they are
    finite, which saves a pass."""
    m = logits.amax(-1) if top is None else top  # [M]
    # a token with every logit −inf here (none of its replayed kept set in this chunk): S = 0
    x = logits - torch.where(torch.isfinite(m), m, 0.0)[:, None]  # [M, V_c] ≤ 0
    e = floored_exp(x)
    if restricted:
        e.masked_fill_(torch.isneginf(x), 0.0)
    t = None
    if tilt:
        t = pairwise_sum(torch.where(e > 0, e * x, 0.0))  # 0·(−inf) would be NaN
    return Normaliser(m, pairwise_sum(e), t)


def rescale(part_max: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """d = m_part − m ≤ 0 and e^d in float64; 0 and 0 for a part with no finite logit (S = T = 0
    there), so that −inf − (−inf) makes no NaN."""
    live = torch.isfinite(part_max)
    d = torch.where(live, part_max.to(WIDE) - m.to(WIDE), 0.0)
    return d, torch.where(live, torch.exp(d), 0.0)


def merge(a: Normaliser, b: Normaliser) -> Normaliser:
    """The normaliser of two chunks together (either order gives the same value)."""
    m = torch.maximum(a.max, b.max)
    (da, fa), (db, fb) = rescale(a.max, m), rescale(b.max, m)
    t = None
    if a.tilt is not None and b.tilt is not None:
        t = fa * (a.tilt + da * a.sum) + fb * (b.tilt + db * b.sum)
    return Normaliser(m, fa * a.sum + fb * b.sum, t)


def merge_all(maxes: Tensor, sums: Tensor, tilts: Tensor | None = None) -> Normaliser:
    """The normaliser of P parts at once, given as [P, M] maxima (softmax dtype), sums and tilts
    (float64): `merge` over all of them, the P terms added in order by a compensated sum, so
    that the combination adds one rounding whatever P (the vocab-parallel engine's ranks)."""
    m = maxes.amax(0)  # [M]
    d, f = rescale(maxes, m)  # [P, M]
    t = None if tilts is None else compensated_sum(f * (tilts + d * sums))
    return Normaliser(m, compensated_sum(f * sums), t)


def probabilities(log_pi: Tensor, keep: Tensor | None = None) -> Tensor:
    """π = exp(log π) [M, V_c] by `floored_exp`; exactly 0 where ``keep`` is False (entries
    outside a replayed kept set, whose log π is −inf)."""
    probs = floored_exp(log_pi)
    return probs if keep is None else probs.masked_fill_(~keep, 0.0)


def log_probs(logits: Tensor, norm: Normaliser, inplace: bool = False) -> Tensor:
    """[M, V_c] log π = (z − m) − fl(log S) in the softmax dtype (in place on ``logits`` when
    asked)."""
    x = logits.sub_(norm.max[:, None]) if inplace else logits - norm.max[:, None]
    return x.sub_(norm.log_sum()[:, None])


def kept_entries(kept_ids: Tensor, start: int, stop: int) -> Tensor:
    """[M, K] ids of each token's kept set K_t (−1: padding) → [M, stop − start] bool, True where
    vocabulary row ``start + j`` is in K_t (one chunk of the vocabulary; all of it for ``start``
    0 and ``stop`` V)."""
    inside = (kept_ids >= start) & (kept_ids < stop)  # [M, K]
    local = torch.where(inside, kept_ids - start, torch.zeros_like(kept_ids))  # [M, K]
    hits = torch.zeros(kept_ids.shape[0], stop - start, dtype=torch.int32, device=kept_ids.device)
    return hits.scatter_add_(-1, local, inside.to(torch.int32)) > 0  # padding adds 0


def restrict_logits(logits: Tensor, keep: Tensor) -> Tensor:
    """z with −inf outside the kept set: log_softmax of it is log π̃ = log π − log S on K_t, −inf
    elsewhere, and its gradient there is exactly 0 (DeepSeek-V3.2's keep sampling mask)."""
    return logits.masked_fill(~keep, -torch.inf)
