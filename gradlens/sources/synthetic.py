"""A seeded synthetic batch: random hidden states and lm_head, rollouts drawn from π_old.

Construction (all from one `torch.Generator` seeded with ``seed``, so a run is
reproducible on any device):

1. N sequences with lengths uniform in [min_length, max_length], padded to T = max_length.
2. h_t ~ N(0, I_H), W ~ N(0, 1/H) of shape [V, H], then W ← α·W. α is 1/temperature, or the
   value found by bisection that makes the mean entropy of π_θ = softmax(W h) over the valid
   tokens equal the target (the entropy of softmax(α z) falls monotonically in α ≥ 0).
3. π_old is a controlled drift of π_θ: ``none`` (on-policy, ℓ_old = ℓ exactly),
   ``logit_noise`` (z_old = z + scale·ε) or ``stale_weight`` (W_old = W + scale·std(W)·ε).
4. y_t ~ π_old (the rollout policy samples), ℓ_old = log π_old(y_t). With
   ``rollout_drift`` set, the inference engine's μ_old (z_μ = z_old + rollout_drift·ε, the
   bf16-like mismatch of a rollout engine) samples instead, and ℓ_rollout = log μ_old(y_t).
5. Per-sequence rewards (Bernoulli or Gaussian) → advantages by ``advantage.normalization``,
   broadcast to every token of the sequence (outcome reward). Consecutive ``group_size``
   sequences form one prompt group (``Batch.groups``).
6. With ``ref_drift`` set, a reference policy z_ref = z + ref_drift·ε (drawn last, so that
   nothing above changes), ℓ_ref = log π_ref(y_t).
7. With ``teacher: perturbed``, a distillation teacher on the finished batch: the same hidden
   states and W' = W + teacher_scale·std(W)·ε from random streams of its own, so nothing above
   changes (`gradlens.sources.synthetic_teacher`; no [N, T, V] at any size).

Steps 2–6 hold [N, T, V] tensors in float64 (several at once) and bisect over whole logits: they
run while N·T·V and V·H are at most ``MATERIALIZE_ENTRIES`` (the default batch and every
shipped config). Larger batches draw the lengths, h and the rewards from the same generator,
and W, the drifts, the tokens and their log-probs by `gradlens.sources.synthetic_chunked`: the
same recipe in vocabulary blocks, from random streams of its own, within a memory budget.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gradlens.advantages import advantages_from_rewards
from gradlens.config import SyntheticSource
from gradlens.containers import Batch, Namer, Origin
from gradlens.engine.streamed import auto_budget
from gradlens.errors import GradlensError
from gradlens.logits import compute_logits, softmax_dtype, token_logp
from gradlens.memory import Estimate, Shape, dtype_bytes
from gradlens.sources.base import SourceContext, SourcePlan
from gradlens.sources.synthetic_calibration import ROW_TILE, VOCAB_BLOCK
from gradlens.sources.synthetic_chunked import build_chunked, working_bytes
from gradlens.sources.synthetic_teacher import perturbed_teacher
from gradlens.validation import all_finite


def mean_entropy(logits: Tensor) -> float:
    """Mean over rows of H(softmax(z)) = logsumexp(z) − Σ π z."""
    logp = torch.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def entropy_scale(logits: Tensor, target: float, rtol: float = 1e-6) -> float:
    """α ≥ 0 with mean entropy of softmax(α·z) = target, to relative precision ``rtol`` in α.

    Bisection, since the entropy of softmax(α z) falls monotonically in α; float32 suffices
    for a calibration target.
    """
    logits = logits.float()
    lo, hi = 0.0, 1.0
    while mean_entropy(hi * logits) > target and hi < 1e6:
        lo, hi = hi, 2.0 * hi
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if mean_entropy(mid * logits) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


MATERIALIZE_ENTRIES = 1 << 22  # N·T·V and V·H up to this: the materialized construction


def materialized(src: SyntheticSource) -> bool:
    """Whether the batch is small enough for the construction above ([N, T, V] tensors in
    float64); larger ones are built in vocabulary blocks (`gradlens.sources.synthetic_chunked`)."""
    n, t, v, h = src.num_sequences, src.max_length, src.vocab_size, src.hidden_size
    return n * t * v <= MATERIALIZE_ENTRIES and v * h <= MATERIALIZE_ENTRIES


def build_synthetic(src: SyntheticSource, ctx: SourceContext) -> Batch:
    """The batch described by a `SyntheticSource` section."""
    gen = torch.Generator().manual_seed(ctx.seed)
    n, t, h = src.num_sequences, src.max_length, src.hidden_size

    lengths = torch.randint(src.min_length, src.max_length + 1, (n,), generator=gen)  # [N]
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)  # [N, T, H]
    if materialized(src):
        batch = _build_materialized(src, ctx, gen, mask, hidden)
    else:
        batch = _build_chunked(src, ctx, gen, mask, hidden)
    if src.teacher == "none":
        return batch
    teacher = perturbed_teacher(
        batch.hidden, batch.weight, batch.tokens, batch.mask, src.teacher_scale, ctx.seed
    )
    return dataclasses.replace(
        batch,
        teacher=teacher,
        source=f"{batch.source}, teacher {src.teacher}({src.teacher_scale})",
    )


def _build_materialized(
    src: SyntheticSource, ctx: SourceContext, gen: torch.Generator, mask: Tensor, hidden: Tensor
) -> Batch:
    """Steps 2–6 of the module docstring on whole [N, T, V] tensors."""
    dtype = ctx.dtype
    n, t, v, h = src.num_sequences, src.max_length, src.vocab_size, src.hidden_size
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)  # [V, H]
    if src.entropy is not None:  # the config validates that exactly one of the two is set
        weight = weight * entropy_scale(hidden[mask] @ weight.T, src.entropy)
    elif src.temperature is not None:
        weight = weight / src.temperature

    hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
    scale_setting = "source.entropy" if src.entropy is not None else "source.temperature"
    finite(weight_c, scale_setting, "the lm_head W", dtype)
    logits = compute_logits(hidden_c, weight_c)  # [N, T, V], exactly as the engine computes it
    finite(logits, scale_setting, "the logits W·h", dtype)
    drift = src.drift
    if drift.kind == "stale_weight":
        noise = torch.randn(v, h, generator=gen, dtype=torch.float64)
        stale = (weight + drift.scale * weight.std() * noise).to(dtype)
        old_logits = compute_logits(hidden_c, stale)
    elif drift.kind == "logit_noise":
        noise = torch.randn(n, t, v, generator=gen, dtype=torch.float64)
        old_logits = logits + (drift.scale * noise).to(logits.dtype)
    else:
        old_logits = logits
    finite(old_logits, "source.drift.scale", "π_old's logits", dtype)

    sampler_logits = old_logits
    if src.rollout_drift is not None:  # μ_old: the inference engine's view of π_old
        noise = torch.randn(n, t, v, generator=gen, dtype=torch.float64)
        sampler_logits = old_logits + (src.rollout_drift * noise).to(old_logits.dtype)
        finite(sampler_logits, "source.rollout_drift", "μ_old's logits", dtype)
    sampler_probs = torch.softmax(sampler_logits.double(), dim=-1).reshape(n * t, v)  # [N*T, V]
    tokens = torch.multinomial(sampler_probs, 1, generator=gen).view(n, t)  # [N, T]
    old_logp = token_logp(old_logits, tokens)  # [N, T]
    rollout_logp = None if src.rollout_drift is None else token_logp(sampler_logits, tokens)

    advantages, note = _advantages(src, ctx, gen, mask)
    ref_logp = None
    if src.ref_drift is not None:  # π_ref: a drift of π_θ, drawn last (nothing above changes)
        noise = torch.randn(n, t, v, generator=gen, dtype=torch.float64)
        ref_logits = logits + (src.ref_drift * noise).to(logits.dtype)
        finite(ref_logits, "source.ref_drift", "π_ref's logits", dtype)
        ref_logp = token_logp(ref_logits, tokens)
    return _batch(
        src,
        ctx,
        hidden_c,
        weight_c,
        tokens,
        mask,
        old_logp,
        advantages.to(old_logp.dtype),
        rollout_logp,
        ref_logp,
        note,
        "",
    )


def _build_chunked(
    src: SyntheticSource, ctx: SourceContext, gen: torch.Generator, mask: Tensor, hidden: Tensor
) -> Batch:
    """Steps 2–6 in vocabulary blocks (`gradlens.sources.synthetic_chunked`), over the valid
    tokens; padded positions get token 0 and log-probs 0."""
    hidden_c = hidden.to(ctx.dtype)
    budget = ctx.memory_budget_bytes or auto_budget(torch.device("cpu"))
    built = build_chunked(src, hidden_c[mask], ctx.seed, budget)
    acc = built.old_logp.dtype
    # No [M, V] logits to check: the weight, and each policy's log-probs, which are not finite
    # where that policy's logits overflowed anywhere in the row.
    scale_setting = "source.entropy" if src.entropy is not None else "source.temperature"
    finite(built.weight, scale_setting, "the lm_head W", ctx.dtype)
    finite(built.old_logp, "source.drift.scale", "π_old's log-probs", ctx.dtype)
    if built.rollout_logp is not None:
        finite(built.rollout_logp, "source.rollout_drift", "μ_old's log-probs", ctx.dtype)
    if built.ref_logp is not None:
        finite(built.ref_logp, "source.ref_drift", "π_ref's log-probs", ctx.dtype)

    def on_grid(values: Tensor) -> Tensor:  # [M] → [N, T], zero at padded positions
        return torch.zeros(mask.shape, dtype=values.dtype).masked_scatter_(mask, values)

    advantages, note = _advantages(src, ctx, gen, mask)
    return _batch(
        src,
        ctx,
        hidden_c,
        built.weight,
        on_grid(built.tokens),
        mask,
        on_grid(built.old_logp),
        advantages.to(acc),
        None if built.rollout_logp is None else on_grid(built.rollout_logp),
        None if built.ref_logp is None else on_grid(built.ref_logp),
        note,
        f", built in blocks of {VOCAB_BLOCK} vocabulary rows",
    )


def _advantages(
    src: SyntheticSource, ctx: SourceContext, gen: torch.Generator, mask: Tensor
) -> tuple[Tensor, str]:
    """Step 5: per-sequence rewards → advantages [N, T] (float64, zero at padded positions)."""
    n = src.num_sequences
    if src.rewards.kind == "binary":
        rewards = torch.bernoulli(torch.full((n,), src.rewards.p_correct), generator=gen)
    else:
        rewards = torch.randn(n, generator=gen)
    adv, note = advantages_from_rewards(
        rewards.double(), ctx.normalization, src.group_size, ctx.advantage_eps
    )
    return adv[:, None] * mask, note  # [N, T]


def _batch(
    src: SyntheticSource,
    ctx: SourceContext,
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    rollout_logp: Tensor | None,
    ref_logp: Tensor | None,
    note: str,
    how: str,
) -> Batch:
    device, drift = ctx.device, src.drift
    policies = "".join(
        f", {name} drift {scale}"
        for name, scale in (("rollout", src.rollout_drift), ("ref", src.ref_drift))
        if scale is not None
    )
    return Batch(
        hidden=hidden.to(device),
        weight=weight.to(device),
        tokens=tokens.to(device),
        mask=mask.to(device),
        old_logp=old_logp.to(device),
        advantages=advantages.to(device),
        rollout_logp=None if rollout_logp is None else rollout_logp.to(device),
        ref_logp=None if ref_logp is None else ref_logp.to(device),
        on_policy=(mask & (drift.kind == "none")).to(device),
        groups=(torch.arange(src.num_sequences) // src.group_size).to(device),
        source=(
            f"synthetic: {src.num_sequences} sequences × ≤{src.max_length} tokens, "
            f"V={src.vocab_size}, H={src.hidden_size}, "
            f"drift {drift.kind}({drift.scale}), {src.rewards.kind} rewards{policies}{how}"
        ),
        advantage_note=note,
        origin=Origin(setting_names(src)),
    )


def plan_synthetic(src: SyntheticSource, ctx: SourceContext) -> SourcePlan:
    """The batch's sizes and the source's peak memory, from the settings alone.

    Whole tensors (`materialized`): the peak is the sampling step: the [N, T, V] logits of π_θ
    (and of π_old and μ_old when they drift) in the softmax dtype, the float64 probabilities the
    sampler draws from beside the float64 copy of the logits they come from, and the last
    float64 noise draw, still held; beside them the float64 and run-dtype copies of the hidden
    states and the lm_head.

    In vocabulary blocks: the float64 and run-dtype hidden states, the valid tokens' copies in
    the run and the softmax dtype (N·T tokens at most), the lm_head in the run dtype, the
    sweep's tiles and weight blocks (`gradlens.sources.synthetic_chunked.working_bytes`) and the
    calibration's kept tiles, which take at most what the memory budget leaves; no [N, T, V].
    """
    n, t, v, h = src.num_sequences, src.max_length, src.vocab_size, src.hidden_size
    s, acc = dtype_bytes(ctx.dtype), dtype_bytes(softmax_dtype(ctx.dtype))
    entries = n * t * v
    if materialized(src):
        drifts = (src.drift.kind != "none") + (src.rollout_drift is not None)
        terms = [
            ("hidden states [N, T, H]", n * t * h * (8 + s)),
            ("lm_head [V, H]", v * h * (8 + s)),
            ("logits [N, T, V]", entries * acc * (1 + drifts)),
            ("sampling probabilities [N·T, V] in float64", entries * 16),
            ("lengths and mask", n * (8 + t)),
        ]
        if src.drift.kind == "logit_noise" or src.rollout_drift is not None or src.ref_drift:
            terms.append(("the last noise draw [N, T, V] in float64", entries * 8))
    else:
        m = n * t  # an upper bound on the valid tokens
        work = working_bytes(h, m)
        budget = ctx.memory_budget_bytes or auto_budget(torch.device("cpu"))
        terms = [
            ("hidden states [N, T, H]", n * t * h * (8 + s)),
            ("valid tokens' hidden states [M, H]", m * h * (s + acc)),
            ("lm_head [V, H]", v * h * s),
            (f"tiles of {ROW_TILE} tokens × {VOCAB_BLOCK} rows and weight blocks", work),
            ("calibration tiles kept (the memory budget)", max(0, budget - work)),
            # float64 [M] vectors: each policy's block max and sum and winning logit, the
            # winning key, the tokens, two uniforms per block and the next block's two
            ("per-token vectors and lengths", m * 8 * 16 + n * (8 + t)),
        ]
    provides = {"rollout_logp"} if src.rollout_drift is not None else set()
    provides |= {"ref_logp"} if src.ref_drift is not None else set()
    if src.teacher == "perturbed":  # W' beside W, and its tiles for log q(y)
        provides |= {"teacher", "teacher_full", "teacher_logp"}
        terms.append(("the teacher's lm_head W' [V, H] and its float64 blocks", v * h * (s + 16)))
        # a tile of logits in float64, its exp and the block's own logits; three [N·T] vectors
        tile = 4 * 8 * ROW_TILE * VOCAB_BLOCK
        terms.append(("the teacher's logit tiles and log q(y)", tile + n * t * 24))
    settings = "source.num_sequences × source.max_length × source.vocab_size (source.hidden_size)"
    return SourcePlan(
        # built on the CPU (one generator for every device), then moved: host memory
        memory=(Estimate("the synthetic source", settings, tuple(terms), host=True),),
        shape=Shape(n, t, v, h, tokens=n * src.min_length),  # at least min_length each
        provides=frozenset(provides),
    )


def finite(x: Tensor, setting: str, what: str, dtype: torch.dtype) -> None:
    """Refuse a setting that makes ``x`` overflow the run's dtype, before anything samples."""
    if not all_finite(x) and not bool(torch.isfinite(x).all()):
        name = str(dtype).removeprefix("torch.")
        raise GradlensError(
            f"{setting}: this value makes {what} overflow {name} (largest finite "
            f"{torch.finfo(dtype).max:.3g}); choose a smaller scale"
        )


SETTINGS = {
    "advantages": "advantage.normalization / advantage.eps (the synthetic advantages)",
    "old_logp": "source.drift (the synthetic π_old)",
    "rollout_logp": "source.rollout_drift (the synthetic μ_old)",
    "ref_logp": "source.ref_drift (the synthetic π_ref)",
    "teacher_hidden": "source.teacher (the synthetic teacher's hidden states: the student's)",
    "teacher_weight": "source.teacher / source.teacher_scale (the synthetic teacher's lm_head)",
    "teacher_logp": "source.teacher / source.teacher_scale (the synthetic teacher's log q(y))",
}


def setting_names(src: SyntheticSource) -> Namer:
    """Each tensor by the setting that made it (`Origin.name`): a synthetic batch has no
    user-written values, only settings."""
    scale = "source.entropy" if src.entropy is not None else "source.temperature"

    def name(field: str, index: tuple[int, ...]) -> str:
        at = f" at {', '.join(map(str, index))}" if index else ""
        what = SETTINGS.get(field, f"{scale} / source.{field} (the synthetic {field})")
        return what + at

    return name
