"""Split invariance: does the batch's gradient depend on how the trainer cuts it?

For a split (micro, dp, ga) and a framework's setting (`gradlens.losses.split.SplitRule`, the
tables in `gradlens.losses.frameworks.conventions`) every token gets the weight w_t^split its
trainer ends up applying, and the full batch the weight w_t^full of the same rule on one
micro-batch.
The loss's per-token gradient g_t does not depend on the split (the micro-batches hold whole
sequences, and g_t reads only its own sequence), so with c_t = w_t·g_t:

    w_t^split / w_t^full                       per token: the split's factor on token t
    ∂L/∂W = Σ_t c_t·(e_y − π_t)·h_tᵀ            for c^full, c^split and c^split − c^full

through one run of the streamed lm_head engine (`gradlens.engine.streamed.lm_head_pass`, three
coefficient vectors per loss). ‖∂L_split/∂W‖ / ‖∂L_full/∂W‖ is the change of the update's size,
‖∂L_split/∂W − ∂L_full/∂W‖ / ‖∂L_full/∂W‖ how far the direction moved too; the check compares the
latter with the rounding a trainer cannot avoid (`gradlens.diagnostics.tolerances.split`).

Only the policy part of each loss is compared (the c-form: an entropy bonus is weighted the same
way but is left out), and only for losses gradlens aggregates: a loss that aggregates itself (a
framework's or user's function) has its weights inside its code, out of reach of the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradlens.containers import Batch, valid_index
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.numbers import num
from gradlens.engine.streamed import auto_budget, lm_head_pass, plan
from gradlens.grads import aggregation_mask, objective, replayed_ids, token_inputs
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.losses.frameworks.conventions import resolve_convention
from gradlens.losses.split import (
    MicroBatch,
    Split,
    SplitRule,
    full_weights,
    micro_batches,
    split_weights,
)
from gradlens.results.split import SplitLoss, SplitMicroBatch, SplitReport, SplitSequence


def loss_factor(rule: SplitRule) -> str:
    """dp^p·ga^q in words: "×dp_size", "÷ga", "1"."""
    parts = []
    for name, power in (("dp", rule.dp_power), ("ga", rule.ga_power)):
        if power == 1:
            parts.append(f"×{name}")
        elif power == -1:
            parts.append(f"÷{name}")
        elif power != 0:
            parts.append(f"×{name}^{power}")
    return " ".join(parts) or "1"


def effective_factor(rule: SplitRule) -> str:
    """The net factor dp^(p−1)·ga^q of a rule whose normaliser does not depend on the split."""
    num_: list[str] = []
    den: list[str] = []
    for name, power in (("dp", rule.dp_power - 1), ("ga", rule.ga_power)):
        for _ in range(abs(power)):
            (num_ if power > 0 else den).append(name)
    top = "·".join(num_) or "1"
    if not den:
        return top
    bottom = den[0] if len(den) == 1 else f"({'·'.join(den)})"
    return f"{top}/{bottom}"


def micro_batch_rows(
    parts: list[MicroBatch], mask: Tensor, ratio: Tensor, valid: Tensor
) -> list[SplitMicroBatch]:
    out = []
    for p in parts:
        rows = slice(p.start, p.stop)
        sel = valid[rows]
        r = ratio[rows][sel]
        out.append(
            SplitMicroBatch(
                index=p.index,
                rank=p.rank,
                step=p.step,
                rows=[p.start, p.stop],
                sequences=int((mask[rows].sum(-1) > 0).sum()),
                tokens=int(mask[rows].sum()),
                weight_ratio_min=num(r.min()) if r.numel() else None,
                weight_ratio_max=num(r.max()) if r.numel() else None,
            )
        )
    return out


def sequence_rows(parts: list[MicroBatch], ratio: Tensor, valid: Tensor) -> list[SplitSequence]:
    """Every row: its micro-batch, valid tokens and mean w_split / w_full (None without one)."""
    out = []
    for p in parts:
        for row in range(p.start, p.stop):
            sel = valid[row]
            r = ratio[row][sel]
            out.append(
                SplitSequence(
                    row=row,
                    micro_batch=p.index,
                    tokens=int(sel.sum()),
                    weight_ratio=num(r.mean()) if r.numel() else None,
                )
            )
    return out


def factor_words(
    rule: SplitRule, invariant: bool, uniform: float | None, micro: list[SplitMicroBatch]
) -> str:
    """What the split does to the weights, in words (invariant, one factor, or per micro-batch)."""
    if invariant:
        return f"split-invariant: {rule.how}; every token keeps its full-batch weight"
    if uniform is not None:
        lr = effective_factor(rule)
        return (
            f"every token's weight is ×{uniform:.4g} = {lr} of the full batch's: {rule.how}; "
            f"the effective learning rate is ∝ {lr}"
        )
    measured = [m for m in micro if m.weight_ratio_min is not None]
    low = min(measured, key=lambda m: m.weight_ratio_min or 0.0)
    high = max(measured, key=lambda m: m.weight_ratio_max or 0.0)

    def about(m: SplitMicroBatch, value: float | None) -> str:
        return f"×{value:.4g} in micro-batch {m.index} ({m.tokens} tokens, {m.sequences} sequences)"

    if low.tokens > high.tokens:
        effect = "long-sequence micro-batches are down-weighted, short ones up-weighted"
    elif low.sequences > high.sequences:
        effect = "micro-batches with more non-empty sequences are down-weighted"
    else:
        effect = "the weight depends on which micro-batch a token lands in"
    return (
        f"{rule.how}: {effect} ({about(low, low.weight_ratio_min)} to "
        f"{about(high, high.weight_ratio_max)})"
    )


def split_report(
    batch: Batch,
    logp: Tensor,
    specs: Sequence[LossSpec],
    params: LossParams,
    aggregation: Aggregation,
    split: Split,
    convention: str,
    budget_bytes: int | None = None,
    vocab_chunk: int | None = None,
    entropy: Tensor | None = None,
) -> SplitReport:
    """The split section (module docstring) for ``batch`` at the log-probs ``logp`` [N, T];
    ``entropy`` [N, T] H(π_t), for losses and settings that read it (`grads.reads_entropy`).

    ``aggregation``: the run's (``loss.aggregation`` picks the setting when ``convention`` does
    not name one; its ``loss_scale_factor`` is L); ``budget_bytes``, ``vocab_chunk``: the
    streamed engine's settings (None: automatic)."""
    conv, rule = resolve_convention(convention, aggregation.mode)
    parts = micro_batches(split, batch.num_sequences)
    mask = aggregation_mask(token_inputs(batch, logp.detach()), params)
    scale = aggregation.loss_scale_factor
    w_split = split_weights(mask, rule, split, scale)  # [N, T] float64
    w_full = full_weights(mask, rule, scale)
    valid = mask & (w_full != 0)
    ratio = torch.where(valid, w_split / torch.where(valid, w_full, 1.0), 1.0)  # [N, T]
    diff = (w_split - w_full).abs().max() if valid.any() else torch.tensor(0.0)
    top = w_full.abs().max() if valid.any() else torch.tensor(1.0)
    weight_rel = num(diff / top) if float(top) > 0 else None
    dtype = batch.weight.dtype
    tolerance = tolerances.split(dtype, split.dp * split.ga)
    invariant = weight_rel is not None and weight_rel <= tolerance
    r_valid = ratio[valid]
    uniform = None
    if r_valid.numel() and not invariant:
        lo, hi = float(r_valid.min()), float(r_valid.max())
        if hi - lo <= tolerance * max(abs(hi), 1.0):
            uniform = hi
    micro = micro_batch_rows(parts, batch.mask & mask, ratio, valid)

    rule_agg = Aggregation(rule.mode, scale, rule.count_empty_sequences)
    used, skipped, grads = [], [], []
    for spec in specs:
        obj = objective(batch, logp.detach(), spec, params, rule_agg, entropy)
        if obj.terms.self_aggregated:
            skipped.append(
                f"{spec.name}: it aggregates itself, so its weights are inside its own code"
            )
            continue
        g = obj.terms.per_token_grad.detach().to(torch.float64)
        used.append(spec)
        grads.append(g)
    losses = _gradients(batch, used, grads, w_full, w_split, budget_bytes, vocab_chunk)
    results = []
    for spec, (full, split_norm, delta) in zip(used, losses, strict=True):
        rel = num(delta / full) if full is not None and delta is not None and full > 0 else None
        passed = rel <= tolerance if rel is not None else invariant
        results.append(
            SplitLoss(
                name=spec.name,
                grad_norm_full=full,
                grad_norm_split=split_norm,
                grad_norm_ratio=None
                if full is None or split_norm is None or full == 0
                else split_norm / full,
                grad_rel_diff=rel,
                passed=passed,
            )
        )
    return SplitReport(
        micro=split.micro,
        dp=split.dp,
        ga=split.ga,
        convention=conv.name,
        framework=conv.framework,
        versions=conv.versions,
        setting=rule.name,
        aggregation=rule.mode,
        count_empty_sequences=rule.count_empty_sequences,
        scope=rule.scope,
        loss_factor=loss_factor(rule),
        how=rule.how,
        source=rule.source,
        weight_ratio_min=num(r_valid.min()) if r_valid.numel() else None,
        weight_ratio_max=num(r_valid.max()) if r_valid.numel() else None,
        weight_ratio_mean=num(r_valid.mean()) if r_valid.numel() else None,
        weight_rel_diff=weight_rel,
        tolerance=tolerance,
        tolerance_reason=tolerances.split_reason(dtype, split.dp * split.ga),
        invariant=invariant,
        factor=factor_words(rule, invariant, uniform, micro),
        micro_batches=micro,
        sequences=sequence_rows(parts, ratio, valid & batch.mask),
        losses=results,
        skipped=skipped,
    )


def _gradients(
    batch: Batch,
    specs: list[LossSpec],
    grads: list[Tensor],
    w_full: Tensor,
    w_split: Tensor,
    budget_bytes: int | None,
    vocab_chunk: int | None,
) -> list[tuple[float | None, float | None, float | None]]:
    """(‖G_full‖, ‖G_split‖, ‖G_split − G_full‖) per loss, from one lm_head pass."""
    if not specs:
        return []
    rows, cols = valid_index(batch.mask)
    hidden = batch.hidden[rows, cols]  # [M, H]
    tokens = batch.tokens[rows, cols]  # [M]
    kept = replayed_ids(batch)
    coefficients: list[Tensor] = []
    for g in grads:
        c_full = (w_full * g)[rows, cols]  # [M], float64
        c_split = (w_split * g)[rows, cols]
        coefficients += [c_full, c_split, c_split - c_full]
    budget = budget_bytes or auto_budget(hidden.device)
    engine_plan = plan(
        tokens.numel(), batch.vocab_size, batch.hidden_size, len(coefficients), budget, vocab_chunk
    )
    result = lm_head_pass(
        hidden,
        batch.weight,
        tokens,
        lambda _logp: coefficients,
        engine_plan,
        kept_ids=None if kept is None else kept[rows, cols],
    )
    norms = [num(stats.norms.to(torch.float64).square().sum().sqrt()) for stats in result.rows]
    return [(norms[3 * i], norms[3 * i + 1], norms[3 * i + 2]) for i in range(len(specs))]
