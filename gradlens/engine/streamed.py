"""The streamed lm_head engine: every lm_head diagnostic without a [T, V] graph or a [V, H] copy.

For M tokens with hidden states h [M, H], an lm_head W [V, H] and k losses with per-token
coefficients c_k [M] (losses.md §0):

    ∂L_k/∂W_v = Σ_{t: y_t = v} c_kt h_t  −  Σ_t c_kt π_tv h_t          (sparse part − dense part)

The dense part of all k losses is one product πᵀ [c_1⊙h | … | c_k⊙h], so with the softmax
shared the work is (1 + k) GEMMs of 2·M·H·V FLOP (performance.md). The coefficients need
log π_θ(y_t), hence the logsumexp over the whole vocabulary, before any row can be formed, so
the engine makes two passes over vocabulary chunks:

1. logits z = h Wᵀ chunk by chunk → the softmax normaliser (m = max z, S = Σ exp(z − m)) and
   z_y per token (`gradlens.logits`: each chunk's S summed in float64, the chunks merged
   pairwise, so its rounding does not depend on the chunk size). The first ``resident``
   chunks keep their logits (a memory budget decides how many), the others are dropped.
2. the caller's losses turn log π(y) = (z_y − m) − log S into c_1..c_k; then, chunk by chunk,
   π = exp((z − m) − log S) (from the kept logits, or recomputed: the same operations as the
   materialized path's, exp floored at e^−87 in float32 as `gradlens.logits` explains), the
   dense GEMM for all losses, the sparse rows by index_add, and from the [V_chunk, k·H]
   result only what is reported: per-row norms and the row sum Σ_v ∂L/∂W_v. Per-token
   statistics (Σ_v π, entropy, the largest non-sampled probability) come from the same π.
   The sums the zero-sum check reads (Σ_v π, Σ_v ∂L/∂W_v, Σ_v E_v) are float64 sums in the
   order of `gradlens.summation`, whatever the chunk size.

Losses that read the per-token entropy (``aspo``, the top-entropy token selection; the
``token_entropy`` flag) get H_t from pass 1, accumulated as for the entropy bonus below, with
the log-probs: ``coefficients_of(logp, entropy)``. The bonus's weights may then depend on H_t
too (the selection weights it by S_t = 1[H_t ≥ threshold]): ``entropy_weight`` is a tensor or
a function of pass 1's H_t, called after the coefficients.

The entropy bonus (losses.md §2.11, ``entropy_weight`` w_t = a_t·c_H) adds to the logit
gradient of every loss the same block E_tv = w_t·π_tv·(log π_tv + H_t), not of the c-form. Pass 1
then also accumulates H_t = log S − T/S with T = Σ exp(z − m)(z − m) (it is needed before pass
2); pass 2 forms E from each chunk's π and log π, runs one more GEMM Eᵀh shared by all
losses, and adds it to the rows of the losses that carry the bonus (not to a difference of two
losses, in which it cancels). Per loss it also keeps Σ_{v≠y} |∂L/∂z_v| and max_{v≠y} |∂L/∂z_v|,
which no longer follow from c_t and π alone.

A distillation term (``loss.distill``, `gradlens.losses.distill`) is another such block,
D_tv = λ·a_t·(u_tv − π_tv·Σ_v u_tv), given by the caller as a `DenseTerm`: the engine calls its
``prepare`` with the logsumexp after pass 1 (a teacher pair runs its own passes over the
teacher's chunks there: its logsumexp, and Σ_v u_tv for the full forms), then asks it for each
chunk's block in pass 2 (one more GEMM over the teacher's chunk in the full forms) and adds it to
the entropy bonus's block: both go through the same Eᵀh GEMM and the same statistics.

GEMM-equivalents: 1 + (1 − f) + k for a resident fraction f of the vocabulary (+ 1 with the
entropy bonus or a distillation term, + the teacher's own). A loss whose
coefficients equal an earlier loss's on most tokens (``ppo_clip`` against ``ppo``: they differ
only on clipped tokens) reuses that loss's dense product and adds a correction over the
differing tokens only: D_k = D_j + πᵀ_{[Δ]} ((c_k − c_j)⊙h)_{[Δ]}. This is exact algebra.

The passes are separate functions (`first_pass`, `second_pass`, `assemble`): `lm_head_pass` runs
them over the whole W, the vocab-parallel engine (`gradlens.engine.vocab_parallel`) over one shard
of W's rows, with its collectives in between and after.

A replayed sampling support (``kept_ids`` [M, K], gradlens.grads): each chunk's logits outside
the token's kept set K_t are set to −inf as soon as they are formed, so the logsumexp, π and
every gradient row are those of π̃ = π on K_t, renormalised, and the rows outside K_t get exactly
0 (their log π is read as 0, so that 0·log 0 adds nothing to the entropy or its bonus). max |z|
is taken before the restriction.

Nothing of size V×H or M×V survives a chunk, except the resident logits the budget allows.
bf16/fp16 operands: the logits GEMM runs in the operand dtype (fp32 accumulation), the
softmax in float32, the dense GEMM in the operand dtype with fp32 accumulation; float32 and
float64 operands keep their dtype throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gradlens.engine.attribution import (
    AttributionPlan,
    AttributionSums,
    LossSums,
    TokenSums,
    entropy_direction,
    logit_grad_block,
)
from gradlens.engine.norms import safe_row_norms
from gradlens.logits import (
    Normaliser,
    kept_entries,
    log_probs,
    merge,
    normaliser,
    probabilities,
    restrict_logits,
    softmax_dtype,
)
from gradlens.memory import available
from gradlens.summation import Cascade, PairwiseSum, pairwise_sum

# coefficients_of(logp [M]) -> [c_1, …, c_k] ([M] each); with ``token_entropy`` the engine
# calls coefficients_of(logp [M], entropy [M]) instead
CoefficientFn = Callable[..., list[Tensor]]
# w_t [M] of the entropy bonus, or a function of pass 1's H_t [M] that gives it
EntropyWeight = Tensor | Callable[[Tensor], Tensor]
SHARE_LIMIT = 0.5  # reuse an earlier loss's dense product when ≤ this share of tokens differ


class DenseTerm(Protocol):
    """A dense logit term shared by every loss, beside the entropy bonus (a distillation term).

    ``prepare(lse, norm)`` is called once after pass 1 with the student's logsumexp [M] and the
    normaliser pass 2 computes log π with (`gradlens.logits.log_probs`);
    ``block(start, end, log_probs, probs)`` returns the term's [M, end − start] logit gradient on
    one vocabulary chunk from the student's log π and π there (it must not keep or modify them);
    ``gemms`` counts the GEMMs it ran, in units of 2·M·H·V."""

    gemms: float

    def prepare(self, lse: Tensor, norm: Normaliser | None = None) -> None: ...

    def block(self, start: int, end: int, log_probs: Tensor, probs: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class EnginePlan:
    """How the vocabulary is cut: ``vocab_chunk`` rows per chunk, the first ``resident``
    chunks' logits kept between the passes."""

    vocab_chunk: int
    resident: int

    def chunks(self, vocab: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.vocab_chunk, vocab)) for s in range(0, vocab, self.vocab_chunk)]


def plan(
    tokens: int,
    vocab: int,
    hidden: int,
    losses: int,
    budget_bytes: int,
    vocab_chunk: int | None = None,
    accum_bytes: int = 4,
    buffers: int = 3,
) -> EnginePlan:
    """Choose chunk sizes for a memory budget (bytes of working memory beyond the inputs).

    A chunk costs about ``buffers`` [M, Vc] float buffers (logits, probabilities, a temporary;
    a fourth for the entropy bonus's block) plus the [Vc, k·H] dense result; the rest of the
    budget keeps logits of whole chunks resident.
    """
    per_row = accum_bytes * (buffers * tokens + 2 * losses * hidden)  # bytes per vocabulary row
    if vocab_chunk is None:
        vocab_chunk = max(256, min(vocab, (budget_bytes // 4) // max(per_row, 1)))
        vocab_chunk = min(vocab, 1 << max(8, (vocab_chunk.bit_length() - 1)))  # a power of 2
    n_chunks = -(-vocab // vocab_chunk)
    spare = budget_bytes - per_row * vocab_chunk
    resident = max(0, min(n_chunks, spare // max(accum_bytes * tokens * vocab_chunk, 1)))
    return EnginePlan(vocab_chunk=int(vocab_chunk), resident=int(resident))


def plan_bytes(
    engine_plan: EnginePlan,
    tokens: int,
    hidden: int,
    losses: int,
    accum_bytes: int = 4,
    buffers: int = 3,
) -> int:
    """The working memory ``engine_plan`` takes: one chunk's buffers and dense result (the
    per-row cost of `plan`), and the resident chunks' logits."""
    per_row = accum_bytes * (buffers * tokens + 2 * losses * hidden)
    resident = accum_bytes * tokens * engine_plan.vocab_chunk * engine_plan.resident
    return per_row * engine_plan.vocab_chunk + resident


def auto_budget(device: torch.device, cap: int = 1 << 30) -> int:
    """Working memory for the engine: a quarter of what is free now, at most ``cap`` bytes
    (``cap`` itself when the free memory cannot be read)."""
    room = available(device)
    free = cap * 4 if room is None else room[0]
    return int(min(free // 4, cap))


@dataclass(frozen=True)
class TokenStats:
    """Per-token quantities shared by every loss, [M] each."""

    lse: Tensor  # logsumexp_v z_tv
    logp: Tensor  # log π(y_t)
    prob_sum: Tensor  # Σ_v π_tv as summed from the entries (1 up to rounding), float64
    entropy: Tensor  # −Σ_v π_tv log π_tv
    max_other_prob: Tensor  # max_{v ≠ y_t} π_tv
    max_abs_logit: Tensor  # max_v |z_tv|
    # the dense non-c-form terms (entropy bonus E, plus a distillation term D), None without:
    entropy_grad_at_y: Tensor | None = None  # (E + D)_t,y_t
    entropy_grad_sum: Tensor | None = (
        None  # Σ_v (E + D)_tv from the entries (0 up to rounding), float64
    )

    @property
    def sampled_prob(self) -> Tensor:
        """π_t(y_t)."""
        return self.logp.exp()


@dataclass(frozen=True)
class RowStats:
    """One loss's lm_head gradient, reduced: no [V, H] tensor is kept."""

    norms: Tensor  # [V] ‖∂L/∂W_v‖
    row_sum: Tensor  # [H] Σ_v ∂L/∂W_v (zero for a pure softmax loss), float64
    # with the entropy bonus only, [M] each: Σ_{v≠y} |∂L/∂z_tv| and max_{v≠y} |∂L/∂z_tv|
    other_mass: Tensor | None = None
    other_max: Tensor | None = None
    # [M] |c| of what entered this loss's dense products, for a loss that reuses another's
    # (|c_j| + |c_k − c_j|: its rounding scales with that, not with |c_k|); None: |c_k|
    gemm_scale: Tensor | None = None


@dataclass(frozen=True)
class EngineResult:
    tokens: TokenStats
    coefficients: list[Tensor]  # [M] c_k per loss, as returned by the caller
    rows: list[RowStats]
    gemm_equivalents: float  # logits GEMMs + dense GEMMs actually run, in units of 2·M·H·V
    attribution: AttributionSums | None = None  # with an `AttributionPlan` only


def dense_dtype(operand: torch.dtype) -> torch.dtype:
    """The dtype of the dense product πᵀ[c⊙h]: the operand dtype for bf16/fp16 (fp32
    accumulation inside the GEMM), the softmax dtype otherwise."""
    return operand if operand in (torch.bfloat16, torch.float16) else softmax_dtype(operand)


def _logits(hidden: Tensor, weight: Tensor) -> Tensor:
    return (hidden @ weight.T).to(softmax_dtype(weight.dtype))


def _chunk_keep(kept_ids: Tensor | None, start: int, end: int) -> Tensor | None:
    """[M, end − start] the chunk's rows in each token's kept set; None: no replayed support."""
    return None if kept_ids is None else kept_entries(kept_ids, start, end)


def share_sources(coefficients: list[Tensor]) -> list[tuple[int, Tensor] | None]:
    """For each loss, (earlier loss, indices where they differ) when that is cheaper."""
    sources: list[tuple[int, Tensor] | None] = [None]
    m = coefficients[0].numel()
    for k in range(1, len(coefficients)):
        best: tuple[int, Tensor] | None = None
        for j in range(k):
            if sources[j] is not None:
                continue  # share only with losses whose dense product is computed directly
            idx = torch.nonzero(coefficients[k] != coefficients[j]).squeeze(-1)
            if idx.numel() <= SHARE_LIMIT * m and (best is None or idx.numel() < best[1].numel()):
                best = (j, idx)
        sources.append(best)
    return sources


def gemm_scales(
    coefficients: list[Tensor], sources: list[tuple[int, Tensor] | None]
) -> list[Tensor | None]:
    """Per loss, [M] |c| of what entered its dense products when it reuses an earlier loss's
    (`share_sources`): |c_j| + |c_k − c_j| on the tokens where they differ, |c_j| elsewhere
    (c_k = c_j there); None for a loss whose product is its own (|c_k|)."""
    out: list[Tensor | None] = []
    for k, src in enumerate(sources):
        if src is None:
            out.append(None)
            continue
        j, diff = src
        scale = coefficients[j].abs()  # [M]
        scale[diff] += (coefficients[k] - coefficients[j])[diff].abs()
        out.append(scale)
    return out


@dataclass(frozen=True)
class FirstPass:
    """Pass 1 over the rows of the weight it was given (a whole lm_head or one shard of it).

    ``norm``: the softmax normaliser over these rows (m, S and, with the entropy bonus, T;
    `gradlens.logits`), the chunks merged pairwise. ``z_y`` is 0 for tokens whose id is outside
    those rows; ``max_other_logit`` max_{v≠y} z_v over them (−inf when the rows hold no other
    id), None unless asked for. ``kept``: the resident chunks' logits, handed to `second_pass`
    (which consumes them).
    """

    norm: Normaliser
    z_y: Tensor  # [M]
    max_abs: Tensor  # [M]
    max_other_logit: Tensor | None
    kept: list[Tensor]
    gemms: float

    @property
    def lse(self) -> Tensor:
        """[M] logsumexp over these rows, in the softmax dtype."""
        return self.norm.lse()

    @property
    def entropy(self) -> Tensor | None:
        """[M] H_t over these rows alone (against their own normaliser), in the softmax dtype;
        None unless the tilt was accumulated."""
        return None if self.norm.tilt is None else self.norm.entropy().to(self.z_y.dtype)


def first_pass(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    plan: EnginePlan,
    entropy: bool = False,
    other_logit: bool = False,
    vocab: int | None = None,
    kept_ids: Tensor | None = None,
) -> FirstPass:
    """Pass 1: the normaliser, z_y and max |z| per token over ``weight``'s rows (``tokens`` are
    row ids of ``weight``; ids outside [0, rows) own no row), keeping the resident chunks'
    logits. GEMMs are counted in units of ``vocab`` rows (default: all of ``weight``'s).
    ``kept_ids`` [M, K]: the replayed kept sets (row ids of ``weight``), the logits outside them
    −inf (a token none of whose kept rows is in a chunk has S = 0 there)."""
    m, v = hidden.shape[0], weight.shape[0]
    unit = v if vocab is None else vocab
    acc = softmax_dtype(weight.dtype)
    gemms = 0.0
    kept: list[Tensor] = []
    # chunks merge pairwise (`Cascade`): the rounding of S does not depend on the chunking
    cascade: Cascade[Normaliser] = Cascade(merge)
    z_y = torch.zeros(m, dtype=acc, device=hidden.device)
    max_abs = torch.zeros(m, dtype=acc, device=hidden.device)
    max_other = torch.full((m,), -torch.inf, dtype=acc, device=hidden.device)
    for i, (start, end) in enumerate(plan.chunks(v)):
        z = _logits(hidden, weight[start:end])  # [M, Vc]
        gemms += (end - start) / unit
        lo, hi = torch.aminmax(z, dim=-1)
        max_abs = torch.maximum(max_abs, torch.maximum(hi.abs(), lo.abs()))
        keep = _chunk_keep(kept_ids, start, end)
        if keep is not None:
            z = restrict_logits(z, keep)
        # the restricted logits' own max when a kept set is replayed
        top, restricted = (hi, False) if keep is None else (None, True)
        cascade.add(normaliser(z, tilt=entropy, top=top, restricted=restricted))
        inside = (tokens >= start) & (tokens < end)
        local = (tokens - start).clamp(0, end - start - 1)[:, None]  # [M, 1]
        z_at = z.gather(-1, local).squeeze(-1)  # [M]
        z_y = torch.where(inside, z_at, z_y)
        if other_logit:  # the sampled entry set to −inf for the max, then put back
            z.scatter_(-1, local, torch.where(inside, -torch.inf, z_at)[:, None])
            max_other = torch.maximum(max_other, z.amax(-1))
            z.scatter_(-1, local, z_at[:, None])
        if i < plan.resident:
            kept.append(z)
    norm = cascade.result()
    if norm is None:
        raise ValueError("first_pass: the weight has no rows")
    return FirstPass(norm, z_y, max_abs, max_other if other_logit else None, kept, gemms)


@dataclass(frozen=True)
class SecondPass:
    """Pass 2's reductions over the rows of the weight it was given.

    ``norms`` [rows] and ``row_sums`` [H] per loss; per token [M]: Σ π, −Σ π log π and
    max_{v≠y} π over these rows, and with the entropy bonus Σ E (``entropy_grad_sum``) and, per
    loss carrying the bonus, Σ_{v≠y} |∂L/∂z_v| and max_{v≠y} |∂L/∂z_v|. ``row_sums``,
    ``prob_sum`` and ``entropy_grad_sum``, the sums the zero-sum check reads, are float64 sums in
    the fixed order of `gradlens.summation`. ``gemm_scale`` per loss: [M] |c| of what entered its
    dense products when it reuses another loss's (|c_j| + |c_k − c_j|), else None.
    """

    norms: list[Tensor]
    row_sums: list[Tensor]
    prob_sum: Tensor
    entropy: Tensor
    max_other: Tensor
    entropy_grad_sum: Tensor | None
    other_mass: list[Tensor]
    other_max: list[Tensor]
    gemms: float
    gemm_scale: list[Tensor | None]
    attribution: AttributionSums | None = None
    dense_at_y: Tensor | None = None  # [M] a `DenseTerm`'s block at the sampled entry


def second_pass(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    norm: Normaliser,
    coefficients: list[Tensor],
    plan: EnginePlan,
    kept: list[Tensor],
    entropy: Tensor | None = None,
    entropy_weight: Tensor | None = None,
    entropy_losses: int | None = None,
    vocab: int | None = None,
    gemms: float = 0.0,
    kept_ids: Tensor | None = None,
    attribution: AttributionPlan | None = None,
    dense_term: DenseTerm | None = None,
) -> SecondPass:
    """Pass 2 over ``weight``'s rows: probabilities π = exp((z − m) − log S) from the *global*
    normaliser ``norm`` ([M] each), the dense GEMM for all losses, the sparse rows of the tokens
    inside these rows, the reductions.

    ``coefficients``: [M] c_k per loss, in the softmax dtype. ``entropy`` [M] the global H_t and
    ``entropy_weight`` [M] w_t when the bonus is on. ``kept``: `FirstPass.kept`, consumed.
    ``gemms``: the count so far (pass 1's), continued. ``kept_ids``: as `first_pass`'s.
    ``attribution``: also accumulate the attribution sums of its first losses from each
    chunk's rows (`gradlens.engine.attribution`; it needs ``entropy``).
    ``dense_term``: a distillation term, prepared, added to the bonus's block (or alone).
    """
    m, v = hidden.shape[0], weight.shape[0]
    unit = v if vocab is None else vocab
    acc = softmax_dtype(weight.dtype)
    chunks = plan.chunks(v)
    ent_w = None if entropy_weight is None else entropy_weight.to(acc)
    if ent_w is not None and entropy is None:
        raise ValueError("second_pass: the entropy bonus needs H_t (entropy)")
    if attribution is not None and entropy is None:
        raise ValueError("second_pass: the attribution needs H_t (entropy)")
    k = len(coefficients)
    sources = share_sources(coefficients)
    direct = [i for i in range(k) if sources[i] is None]
    h_acc = hidden.to(acc)
    gemm_dtype = dense_dtype(hidden.dtype)
    H = hidden.shape[1]
    # −c_i⊙h [M, k'·H], written in place (no second [M, k'·H] while built): the GEMM operand
    # whose product is the rows' dense part −πᵀ(c⊙h) itself (negation is exact, so these are
    # the numbers of −(πᵀ(c⊙h))), subtracted again (alpha −1) for the sampled rows' +c_t h_t
    scaled = torch.empty(m, len(direct) * H, dtype=acc, device=hidden.device)
    for n, i in enumerate(direct):
        block = scaled[:, n * H : (n + 1) * H]
        torch.mul(coefficients[i][:, None], h_acc, out=block).neg_()
    deltas = {
        i: (
            src[0],
            src[1],
            ((coefficients[i] - coefficients[src[0]])[src[1], None] * h_acc[src[1]]),
        )
        for i, src in enumerate(sources)
        if src is not None
    }
    extra = ent_w is not None or dense_term is not None
    n_ent = 0 if not extra else (k if entropy_losses is None else entropy_losses)
    dense_at_y = None if dense_term is None else torch.zeros(m, dtype=acc, device=hidden.device)
    h_gemm = h_acc.to(gemm_dtype)
    scaled_gemm = scaled.to(gemm_dtype)  # the GEMM operand, converted once (bf16 operands)
    ent_sum = PairwiseSum((m,), hidden.device)
    other_mass = [torch.zeros(m, dtype=acc, device=hidden.device) for _ in range(n_ent)]
    other_max = [torch.zeros(m, dtype=acc, device=hidden.device) for _ in range(n_ent)]

    norms = [torch.empty(v, dtype=acc, device=hidden.device) for _ in range(k)]
    row_sums = [PairwiseSum((H,), hidden.device) for _ in range(k)]
    prob_sum = PairwiseSum((m,), hidden.device)
    entropy_sum = torch.zeros(m, dtype=acc, device=hidden.device)
    max_other = torch.zeros(m, dtype=acc, device=hidden.device)
    attr_tokens = attr_losses = None
    if attribution is not None and entropy is not None:
        n_seq = attribution.layout.num_sequences
        attr_tokens = TokenSums.zeros(m, acc, hidden.device)
        attr_losses = [
            LossSums.zeros(m, n_seq, acc, hidden.device) for _ in range(attribution.losses)
        ]

    for i, (start, end) in enumerate(chunks):
        keep = _chunk_keep(kept_ids, start, end)
        if i < len(kept):
            z, kept[i] = kept[i], torch.empty(0)  # restricted in pass 1 already
        else:
            z = _logits(hidden, weight[start:end])
            gemms += (end - start) / unit
            if keep is not None:
                z = restrict_logits(z, keep)
        probs = probabilities(log_probs(z, norm, inplace=True), keep)  # [M, Vc]; z: log π
        if keep is not None:
            z.masked_fill_(~keep, 0.0)  # log π read as 0 where π = 0: 0·log 0 adds nothing
        prob_sum.add(pairwise_sum(probs))
        entropy_sum -= torch.linalg.vecdot(probs, z)
        inside = torch.nonzero((tokens >= start) & (tokens < end)).squeeze(-1)
        local = tokens[inside] - start
        ent_block = e = None
        # a distillation term's block, from log π before anything below overwrites it
        dist = None if dense_term is None else dense_term.block(start, end, z, probs)  # [M, Vc]
        d = None  # d = π·(log π + H), in place of log π
        if entropy is not None and (ent_w is not None or attr_tokens is not None):
            d = entropy_direction(z, probs, entropy)  # [M, Vc]
        if attr_tokens is not None and d is not None:
            attr_tokens.add(probs, d, inside, local)
        if ent_w is not None and d is not None:  # E = w·d, in place of d unless d is kept
            e = d.mul_(ent_w[:, None]) if attr_tokens is None else d * ent_w[:, None]  # [M, Vc]
        if dist is not None and dense_at_y is not None:
            e = dist if e is None else e + dist
            dense_at_y[inside] += dist[inside, local]
        if e is not None:
            ent_sum.add(pairwise_sum(e))
            ent_block = (e.T.to(gemm_dtype) @ h_gemm).to(acc)  # [Vc, H], shared by all losses
            gemms += (end - start) / unit
        del z
        rows = (probs.T.to(gemm_dtype) @ scaled_gemm).to(acc)  # [Vc, k'·H] −πᵀ(c⊙h)
        gemms += (end - start) / unit * len(direct)
        rows.index_add_(0, local, scaled[inside], alpha=-1)  # + c_t h_t on the sampled rows
        per_loss: dict[int, Tensor] = {
            idx: rows[:, n * H : (n + 1) * H] for n, idx in enumerate(direct)
        }
        for idx, (j, diff_idx, diff_scaled) in deltas.items():
            delta = probs[diff_idx].T.to(gemm_dtype) @ diff_scaled.to(gemm_dtype)  # [Vc, H]
            gemms += (end - start) / unit * diff_idx.numel() / max(m, 1)
            r = per_loss[j] - delta.to(acc)
            sel = (tokens[diff_idx] >= start) & (tokens[diff_idx] < end)
            r.index_add_(0, tokens[diff_idx][sel] - start, diff_scaled[sel])
            per_loss[idx] = r
        for idx in range(k):
            r = per_loss[idx]
            if ent_block is not None and e is not None and idx < n_ent:
                r = r + ent_block
                g = torch.addcmul(e, probs, coefficients[idx][:, None], value=-1).abs_()
                g[inside, local] = 0.0  # ∂L/∂z_v = E_v − c·π_v off the sampled entry
                other_mass[idx] += g.sum(-1)
                other_max[idx] = torch.maximum(other_max[idx], g.amax(-1))
                del g
            norms[idx][start:end] = safe_row_norms(r)  # no underflow of tiny rows' squares
            row_sums[idx].add(pairwise_sum(r, dim=0))
            if attr_losses is not None and attribution is not None and d is not None:
                if idx >= attribution.losses:
                    continue
                bonus = e if idx < n_ent else None
                grad = logit_grad_block(probs, coefficients[idx], inside, local, bonus)
                attr_losses[idx].add(r, h_acc, probs, d, grad, inside, local, attribution.layout)
                gemms += attribution.gemm_equivalents(end - start, m, H, unit)
        probs[inside, local] = 0.0  # drop the sampled entry before the max
        max_other = torch.maximum(max_other, probs.amax(-1))

    return SecondPass(
        norms,
        [s.total() for s in row_sums],
        prob_sum.total(),
        entropy_sum,
        max_other,
        None if not extra else ent_sum.total(),
        other_mass,
        other_max,
        gemms,
        gemm_scales(coefficients, sources),
        None
        if attr_tokens is None or attr_losses is None or entropy is None
        else AttributionSums(attr_tokens, attr_losses, entropy),
        dense_at_y,
    )


def assemble(
    lse: Tensor,
    logp: Tensor,
    max_abs: Tensor,
    max_other_prob: Tensor,
    entropy: Tensor | None,
    coefficients: list[Tensor],
    second: SecondPass,
    entropy_weight: Tensor | None,
    gemms: float,
) -> EngineResult:
    """The `EngineResult` from the per-token statistics and pass 2's (reduced) output;
    ``entropy`` is pass 1's H_t (needed with the entropy bonus only)."""
    ent_y = second.dense_at_y
    if entropy_weight is not None and entropy is not None:
        bonus_y = entropy_weight.to(lse.dtype) * logp.exp() * (logp + entropy)
        ent_y = bonus_y if ent_y is None else ent_y + bonus_y
    n_ent = len(second.other_mass)
    return EngineResult(
        tokens=TokenStats(
            lse,
            logp,
            second.prob_sum,
            second.entropy,
            max_other_prob,
            max_abs,
            ent_y,
            second.entropy_grad_sum,
        ),
        coefficients=coefficients,
        rows=[
            RowStats(
                n,
                s,
                second.other_mass[i] if i < n_ent else None,
                second.other_max[i] if i < n_ent else None,
                second.gemm_scale[i],
            )
            for i, (n, s) in enumerate(zip(second.norms, second.row_sums, strict=True))
        ],
        gemm_equivalents=gemms,
        attribution=second.attribution,
    )


def sampled_logp(z_y: Tensor, norm: Normaliser) -> Tensor:
    """[M] log π(y) = (z_y − m) − log S, by the same two roundings as every log π of pass 2."""
    return log_probs(z_y[:, None], norm).squeeze(-1)


def coefficients_at(
    coefficients_of: CoefficientFn,
    logp: Tensor,
    entropy: Tensor | None,
    token_entropy: bool,
    dtype: torch.dtype,
) -> list[Tensor]:
    """The caller's coefficients in ``dtype``: ``coefficients_of(logp)``, or with
    ``token_entropy`` ``coefficients_of(logp, entropy)`` (pass 1's H_t)."""
    if token_entropy:
        if entropy is None:
            raise ValueError("the losses read H_t but pass 1 did not compute it")
        raw = coefficients_of(logp, entropy)
    else:
        raw = coefficients_of(logp)
    return [c.to(dtype) for c in raw]


def bonus_weight(entropy_weight: EntropyWeight | None, entropy: Tensor | None) -> Tensor | None:
    """w_t [M] of the entropy bonus: ``entropy_weight`` itself, or its value at pass 1's H_t."""
    if entropy_weight is None or not callable(entropy_weight):
        return entropy_weight
    if entropy is None:
        raise ValueError("the entropy bonus needs pass 1's H_t")
    return entropy_weight(entropy)


def lm_head_pass(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    coefficients_of: CoefficientFn,
    plan: EnginePlan,
    entropy_weight: EntropyWeight | None = None,
    entropy_losses: int | None = None,
    token_entropy: bool = False,
    *,
    kept_ids: Tensor | None = None,
    attribution: AttributionPlan | None = None,
    dense_term: DenseTerm | None = None,
) -> EngineResult:
    """Run the two passes. ``coefficients_of(logp [M]) -> [c_1, …, c_k]`` ([M] each).

    ``entropy_weight`` [M]: w_t = a_t·c_H of the entropy bonus, added to the first
    ``entropy_losses`` losses (all when None), or a function of pass 1's H_t [M] that returns
    it (called after ``coefficients_of``); None: no bonus. ``token_entropy``: the losses read
    H_t, so pass 1 computes it and the engine calls ``coefficients_of(logp, entropy)``.
    ``kept_ids`` [M, K]: the replayed kept sets K_t (−1 padding), or None: the whole
    vocabulary. ``attribution``: the attribution sums of its first losses too
    (`EngineResult.attribution`). ``dense_term``: a distillation term (`DenseTerm`), prepared
    after ``coefficients_of`` and added to the same losses as the bonus.
    """
    need_h = entropy_weight is not None or token_entropy or attribution is not None
    first = first_pass(hidden, weight, tokens, plan, entropy=need_h, kept_ids=kept_ids)
    logp = sampled_logp(first.z_y, first.norm)
    acc = softmax_dtype(weight.dtype)
    h1 = first.entropy  # H_t, needed before pass 2
    coefficients = coefficients_at(coefficients_of, logp, h1, token_entropy, acc)
    ent_w = bonus_weight(entropy_weight, h1)
    if dense_term is not None:
        dense_term.prepare(first.lse, first.norm)
    second = second_pass(
        hidden,
        weight,
        tokens,
        first.norm,
        coefficients,
        plan,
        first.kept,
        h1,
        ent_w,
        entropy_losses,
        gemms=first.gemms,
        kept_ids=kept_ids,
        attribution=attribution,
        dense_term=dense_term,
    )
    return assemble(
        first.lse,
        logp,
        first.max_abs,
        second.max_other,
        h1,
        coefficients,
        second,
        ent_w,
        second.gemms + (0.0 if dense_term is None else dense_term.gemms),
    )
