"""The streamed engine of `gradlens compare`: every loss's lm_head diagnosis from one engine run.

All losses share one pass over the logits (`gradlens.engine.streamed`): the engine hands the
sampled tokens' log-probs to `coefficients_for`, which evaluates each loss's
`gradlens.grads.objective` on the [N, T] grid exactly as the materialized engine does, and gets
back the per-row norms and the row sum of each loss's ∂L/∂W. Nothing of size M×V or V×H is
kept.

With ``diagnostics.reference: autograd`` each loss is also differentiated by torch.autograd
(which materialises [M, V], one loss at a time) and compared: c_t, the sampled-row logit
gradient ∂L/∂z_y and the row norms ‖∂L/∂W_v‖. By default (``reference: auto``) the check is
sampled (`gradlens.compare.sampled_check`): autograd on the same objective, exact, for c_t of
every token, ∂L/∂z_y of a sample of tokens and the norms of a sample of lm_head rows, without
[M, V] under autograd; ``reference: none`` skips it. Under tensor parallelism the sampled check
runs on every rank after two all_gathers (the constant pass's per-token columns and the sampled
rows W_R; `gradlens.compare.sampled_check.choose_sample_parallel`).

With ``loss.entropy_coef`` ≠ 0 the engine adds the entropy bonus's gradient (not of the c-form)
to every loss's rows, and the reports include it exactly as the materialized path's do; a
distillation term (``loss.distill``, `gradlens.losses.distill.StreamedDistill`) goes the same
way. The fused and vocab-parallel passes take neither the term nor its teacher: they refuse it.

Per-token entropies H_t: when a loss reads them (``needs`` has ``entropy``: ``aspo``), the
top-entropy token selection is on (``loss.top_entropy_quantile`` < 1) or the entropy bonus is,
the engine computes H_t in its first pass and hands it to `coefficients_for` with the log-probs,
so each loss's `objective` sees the same inputs as on the materialized path (its loss includes
the bonus); the bonus's weights a_t·S_t then follow from the same H_t.

Under tensor parallelism (``parallel``: `gradlens.compare.tensor_parallel`) the batch holds this
rank's rows of W and the engine is the vocab-parallel pass (`gradlens.engine.vocab_parallel`),
planned for the largest rank's rows with the smallest rank's memory budget; it returns the result
of the whole W on every rank, so everything after it is the same code. Its GEMM count is the
total over all ranks.

With ``--parity A,B`` the same run also gives parity's inputs (`gradlens.compare.parity`): A
and B join the engine's losses if they are not among them (without a loss report of their own),
and one
more coefficient set, c_B − c_A, gives the row norms of ∂L_B/∂W − ∂L_A/∂W, which is of the same
c-form. The logit-gradient gap follows from c_A, c_B and per-token statistics (`streamed_gap`).

With ``diagnostics.attribution`` the engine also accumulates the attribution sums of every
reported loss (`gradlens.engine.attribution`): one more product of each chunk's rows with h and
the per-sequence norms, about one GEMM-equivalent per loss (counted in ``gemm_equivalents``);
the vocab-parallel engine sums them over the ranks. The fused engine has no attribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.compare.engines import EngineOptions, EngineRun
from gradlens.compare.parity import ParityInputs, ParityLoss, streamed_gap
from gradlens.compare.records import LossRecord, TokenSummary
from gradlens.compare.sampled_check import (
    BLOCK_ENTRIES,
    SAMPLED_TOKENS,
    SPREAD_ROWS,
    TOP_ROWS,
    DistillInputs,
    Sample,
    choose_sample,
    choose_sample_parallel,
    sampled_reference,
)
from gradlens.compare.tensor_parallel import VocabParallel
from gradlens.containers import Batch, valid_index
from gradlens.diagnostics.agreement import judged, not_run, row_scales
from gradlens.diagnostics.attribution import AttributionInputs
from gradlens.diagnostics.metrics import terms_metrics
from gradlens.diagnostics.numbers import count_non_finite, max_ratio, num, rel_err
from gradlens.diagnostics.row_norms import row_norms_from
from gradlens.diagnostics.streamed import grad_at_y, sampled_row_streamed, zero_sum_streamed
from gradlens.engine.attribution import AttributionPlan, sequence_layout
from gradlens.engine.fused import check_device, fused_lm_head_pass
from gradlens.engine.norms import safe_row_norms
from gradlens.engine.streamed import (
    EngineResult,
    auto_budget,
    dense_dtype,
    lm_head_pass,
    plan,
    plan_bytes,
)
from gradlens.engine.vocab_parallel import vocab_parallel_pass
from gradlens.errors import GradlensError
from gradlens.grads import (
    Objective,
    autograd_reference,
    distill_term,
    objective,
    on_grid,
    reads_entropy,
    replayed_ids,
)
from gradlens.logits import softmax_dtype
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.losses.distill import StreamedDistill
from gradlens.memory import Estimate, Shape, dtype_bytes
from gradlens.results import Agreement, EngineInfo


def run_streamed(
    batch: Batch,
    specs: list[LossSpec],
    params: LossParams,
    aggregation: Aggregation,
    options: EngineOptions,
    reason: str,
    pairs: list[tuple[LossSpec, LossSpec]] | None = None,
    fused: bool = False,
    parallel: VocabParallel | None = None,
) -> EngineRun:
    """Every loss of ``specs`` through one engine run, and parity's inputs for each of ``pairs``.

    ``fused``: the passes with Triton kernels between the GEMMs (`gradlens.engine.fused`), the
    same result (the engine path ``fused``, opt-in). ``parallel``: this rank's tensor-parallel
    group; ``batch`` then holds the rank's rows of W (`Batch.weight_rows`).
    """
    if params.distill is not None and (fused or parallel is not None):
        raise GradlensError(
            "loss.distill runs on the materialized and streamed engines; the fused and "
            "vocab-parallel passes do not carry its dense teacher term (set diagnostics.engine "
            "streamed or materialized, and tensor_parallel 1)"
        )
    if fused:
        check_device(batch.weight.device)
    if fused and parallel is not None:
        raise GradlensError(
            "diagnostics.engine: 'fused' runs in one process, not under tensor_parallel"
        )
    kept_ids = replayed_ids(batch)
    if params.distill is not None and kept_ids is not None:
        raise GradlensError(
            "loss.distill runs on the full vocabulary; with loss.sampling_support: 'kept' the "
            "student is restricted to its kept sets (set sampling_support: full)"
        )
    if kept_ids is not None and fused:
        raise GradlensError(
            "loss.sampling_support: 'kept' runs on the materialized, streamed and vocab-parallel "
            "engines; the fused passes do not restrict π to the kept sets (set diagnostics.engine "
            "streamed)"
        )
    if fused and options.attribution:
        raise GradlensError(
            "diagnostics.attribution: the fused engine does not form the attribution sums; "
            "set engine streamed, or attribution auto or off"
        )
    rows, cols = valid_index(batch.mask)
    hidden = batch.hidden[rows, cols]  # [M, H]
    tokens = batch.tokens[rows, cols]  # [M]
    valid_kept = None if kept_ids is None else kept_ids[rows, cols]  # [M, K]
    names = [s.name for s in specs]
    run_specs = list(specs)
    pairs = pairs or []
    for pair in pairs:
        run_specs += [s for s in dict.fromkeys(pair) if s.name not in names and s not in run_specs]
    reported = len(specs)
    objectives: list[Objective] = []
    grid: list[Tensor] = []  # [N, T] ℓ as the engine computed it

    def coefficients_for(logp_valid: Tensor, entropy_valid: Tensor | None = None) -> list[Tensor]:
        logp = on_grid(logp_valid, rows, cols, batch.mask.shape)
        grid.append(logp)
        entropy = None if entropy_valid is None else on_grid(entropy_valid, rows, cols, logp.shape)
        for spec in run_specs:
            objectives.append(objective(batch, logp, spec, params, aggregation, entropy))
        out = [o.coefficient[rows, cols] for o in objectives]
        for pair in pairs:  # ∂L_B/∂W − ∂L_A/∂W is the c-form gradient of c_B − c_A
            a, b = (objectives[run_specs.index(s)].coefficient for s in pair)
            out.append((b - a)[rows, cols])
        return out

    budget = options.memory_budget_bytes or auto_budget(hidden.device)
    rows_per_rank = batch.vocab_size
    if parallel is not None:  # one plan on every rank: the largest shard, the tightest budget
        budget = parallel.smallest(budget)
        rows_per_rank = max(parallel.split.sizes)
    k = len(run_specs) + len(pairs)
    dense = params.entropy_coef != 0.0 or params.distill is not None
    buffers = 4 if dense else 3  # the bonus's (and distillation's) [M, Vc] block: one more
    acc = softmax_dtype(batch.weight.dtype)
    attribution = None
    if options.attribution:  # d, Q = R hᵀ, a product with it, the logit-gradient block
        buffers += 4
        layout = sequence_layout(rows, batch.num_sequences, hidden.to(acc))
        attribution = AttributionPlan(reported, layout)
    engine_plan = plan(
        tokens.numel(),
        rows_per_rank,
        batch.hidden_size,
        k,
        budget,
        options.vocab_chunk,
        buffers=buffers,
    )
    bonus = params.entropy_coef != 0.0
    # H_t from pass 1 for every loss's objective: the losses or the selection read it, and with
    # the bonus the objective's loss includes −c_H·Σ_t a_t·S_t·H_t
    token_entropy = reads_entropy(run_specs, params)
    entropy_weights: list[Tensor] = []  # [M] w_t = c_H·a_t·S_t of the entropy bonus

    def bonus_weight(entropy_valid: Tensor) -> Tensor:
        """w_t = c_H·a_t·S_t (S_t from the same H_t the objectives saw; 1 when it is off)."""
        w = params.entropy_coef * objectives[0].bonus_weights[rows, cols]
        entropy_weights.append(w.to(softmax_dtype(batch.weight.dtype)))
        return entropy_weights[-1]

    distill = None
    if params.distill is not None:

        def distill_weights() -> Tensor:
            """a_t of the distillation term (pass 1's objectives: the mask may move with π_θ)."""
            return objectives[0].agg_weights[rows, cols]

        distill = StreamedDistill(
            batch.teacher,
            rows,
            cols,
            params.distill,
            hidden,
            batch.weight,
            distill_weights,
            engine_plan.chunks(batch.vocab_size),
            acc,
        )
    if parallel is None and fused:
        result = fused_lm_head_pass(
            hidden,
            batch.weight,
            tokens,
            coefficients_for,
            engine_plan,
            entropy_weight=bonus_weight if bonus else None,
            entropy_losses=len(run_specs),  # not parity's c_B − c_A: the bonus cancels there
            token_entropy=token_entropy,
        )
    elif parallel is None:
        result = lm_head_pass(
            hidden,
            batch.weight,
            tokens,
            coefficients_for,
            engine_plan,
            entropy_weight=bonus_weight if bonus else None,
            entropy_losses=len(run_specs),
            token_entropy=token_entropy,
            kept_ids=valid_kept,
            attribution=attribution,
            dense_term=distill,
        )
    else:
        result = vocab_parallel_pass(
            hidden,
            batch.weight,  # [V_r, H]: this rank's rows
            tokens,
            coefficients_for,
            engine_plan,
            parallel.split,
            parallel.comm,
            entropy_weight=bonus_weight if bonus else None,
            entropy_losses=len(run_specs),
            attribution=attribution,
            token_entropy=token_entropy,
            kept_ids=valid_kept,
        )
    logp = grid[0]
    bonus_scale = None  # the bonus's gross size 2·|c_H|·a_t·S_t·H_t, [M]
    if entropy_weights:
        bonus_scale = 2 * entropy_weights[0].abs() * result.tokens.entropy
    divergence: Tensor | None = None
    if distill is not None:
        bonus_scale = distill.scale if bonus_scale is None else bonus_scale + distill.scale
        divergence = on_grid(distill.value, rows, cols, batch.mask.shape)  # [N, T] D_t
    hidden_norms = safe_row_norms(hidden.to(result.tokens.lse.dtype))  # [M] ‖h_t‖, no underflow

    def loss_value(obj: Objective) -> float:
        """L: the objective's (the bonus from pass 1's H_t included), plus the distillation term
        λ·Σ_t a_t·D_t from the engine's D_t."""
        value = float(obj.loss)
        if params.distill is not None and divergence is not None:
            value += float(distill_term(obj.agg_weights, divergence, params.distill.coef))
        return value

    sample = None
    if options.reference == "sampled" and reported:
        c_abs = torch.stack([result.coefficients[i].abs() for i in range(reported)]).amax(0)
        norms = torch.stack([result.rows[i].norms.double() for i in range(reported)]).amax(0)
        if parallel is None:
            inputs = None
            if params.distill is not None and batch.teacher is not None:
                inputs = DistillInputs(params.distill, batch.teacher, rows, cols)
            sample = choose_sample(hidden, batch.weight, tokens, c_abs, norms, inputs)
        else:  # this rank's rows: two all_gathers give every rank the same sample and W_R
            sample = choose_sample_parallel(
                hidden, batch.weight, tokens, c_abs, norms, parallel.comm, parallel.split
            )
    records = []
    for i, spec in enumerate(run_specs[:reported]):
        c = result.coefficients[i]  # [M]
        stats = result.rows[i]
        obj = objectives[i]
        post = obj.weights[rows, cols] * obj.terms.per_token_grad[rows, cols].abs()
        post = post * (1 - result.tokens.sampled_prob)
        ref_tokens = None
        if options.reference == "full":
            agreement, ref_at_y, ref_non_finite = _agreement(
                batch, spec, params, aggregation, c, result, i, rows, cols, tokens, obj.selection
            )
        elif sample is not None:
            agreement, ref_at_y, ref_non_finite = _sampled_agreement(
                sample, batch, spec, params, aggregation, c, result, i, rows, cols, hidden, tokens,
                obj.selection,
            )  # fmt: skip
            ref_tokens = sample.tokens
        else:
            agreement, ref_at_y, ref_non_finite = not_run(batch.weight.dtype), None, 0
        records.append(
            LossRecord(
                spec=spec,
                objective=obj,
                loss=loss_value(obj),  # the bonus from pass 1's H_t, the distillation term
                non_finite=count_non_finite(c, stats.norms, stats.row_sum),
                reference_non_finite=ref_non_finite,
                sampled_row=sampled_row_streamed(
                    c, result.tokens, spec.post_formula, post, ref_at_y, stats, ref_tokens
                ),
                rows=row_norms_from(stats.norms, tokens, options.top_k),
                zero_sum=zero_sum_streamed(
                    c,
                    result.tokens,
                    stats.row_sum,
                    stats.norms,
                    hidden_norms,
                    batch.vocab_size,
                    dense_dtype(batch.hidden.dtype),
                    stats.other_max,
                    bonus_scale,
                    stats.gemm_scale,
                ),
                agreement=agreement,
                attribution=None
                if result.attribution is None
                else AttributionInputs(
                    sums=result.attribution.losses[i],
                    tokens=result.attribution.tokens,
                    grad_norm_sq=stats.norms.double().square().sum(),
                    entropy=result.attribution.entropy,
                    logp=result.tokens.logp,
                    hidden_norm=hidden_norms,
                ),
            )
        )
    info = EngineInfo(
        path="fused" if fused else "streamed",
        reason=reason,
        vocab_chunk=engine_plan.vocab_chunk,
        resident_chunks=engine_plan.resident,
        budget_bytes=budget,
        gemm_equivalents=result.gemm_equivalents,
        tensor_parallel=1 if parallel is None else parallel.split.world,
        vocab_rows=None if parallel is None else parallel.split.sizes,
    )
    parity = []
    for j, pair in enumerate(pairs):
        ia, ib = (run_specs.index(s) for s in pair)
        a_max = None  # max_v |∂L_A/∂z_tv|, when the entropy bonus makes it other than |c_A|·u
        other_max = result.rows[ia].other_max
        if other_max is not None:
            at_y = grad_at_y(result.coefficients[ia], result.tokens).abs()
            a_max = torch.maximum(at_y, other_max)
        gap = streamed_gap(
            result.coefficients[ia],
            result.coefficients[ib],
            result.rows[len(run_specs) + j].norms,
            result.tokens.sampled_prob,
            result.tokens.max_other_prob,
            a_max,
        )
        parity.append(
            ParityInputs(
                _parity_loss(run_specs[ia], objectives[ia], result, ia, loss_value),
                _parity_loss(run_specs[ib], objectives[ib], result, ib, loss_value),
                gap,
            )
        )
    return EngineRun(
        records=records,
        tokens=TokenSummary(logp, result.tokens.entropy, result.tokens.sampled_prob),
        info=info,
        parity=parity,
    )


def estimate_streamed(
    shape: Shape,
    dtype: torch.dtype,
    losses: int,
    options: EngineOptions,
    device: torch.device,
    entropy: bool = False,
) -> Estimate:
    """The engine's peak: the hidden states of the tokens [M, H], the working memory of its
    plan (`gradlens.engine.streamed.plan`: at least one vocabulary chunk of ≥ 256 rows, whatever
    the budget), per-loss row norms [V] and coefficients [M]; with the reference, autograd's
    [M, V] tensors of one loss; with the sampled check, its constant pass ([block, V] at a time)
    and the tensors one loss takes under autograd ([|S|, V] and [M, |R|],
    `gradlens.compare.sampled_check`); with the attribution, four more buffers per chunk (as
    `run_streamed` plans them) and the hidden states' Gram of each sequence (about M·T entries)."""
    m, v, h = shape.tokens, shape.vocab, shape.hidden
    acc = dtype_bytes(softmax_dtype(dtype))
    buffers = (4 if entropy else 3) + (4 if options.attribution else 0)
    budget = options.memory_budget_bytes or auto_budget(device)
    engine_plan = plan(m, v, h, losses, budget, options.vocab_chunk, buffers=buffers)
    terms = [
        ("hidden states of the tokens [M, H]", m * h * dtype_bytes(dtype)),
        (
            f"vocabulary chunks of {engine_plan.vocab_chunk} rows",
            plan_bytes(engine_plan, m, h, losses, buffers=buffers),
        ),
        ("row norms [V] and coefficients [M] per loss", losses * (v + m) * 8),
    ]
    if options.reference == "full":
        terms.append(("autograd's [M, V] tensors of one loss", 5 * m * v * acc))
    elif options.reference == "sampled":
        tokens_s = min(m, SAMPLED_TOKENS + 1)
        rows_r = min(v, TOP_ROWS + SPREAD_ROWS + tokens_s)
        block = min(m * v, max(BLOCK_ENTRIES, v))  # at least one token's row
        # two [block] buffers, the sampled tokens' logit rows kept, autograd's tensors
        sampled = 2 * block * acc + tokens_s * v * acc + 5 * (tokens_s * v + m * rows_r) * acc
        terms.append(("the sampled check's blocks and its autograd of one loss", sampled))
    if options.attribution:
        terms.append(("attribution: each sequence's Gram of h", m * shape.length * acc))
    return Estimate(
        "the streamed engine",
        "tokens (a chunk holds every token's logits for its vocabulary rows)",
        tuple(terms),
    )


def run_fused(
    batch: Batch,
    specs: list[LossSpec],
    params: LossParams,
    aggregation: Aggregation,
    options: EngineOptions,
    reason: str,
    pairs: list[tuple[LossSpec, LossSpec]] | None = None,
) -> EngineRun:
    """`run_streamed` with the fused passes."""
    return run_streamed(batch, specs, params, aggregation, options, reason, pairs, fused=True)


def _parity_loss(
    spec: LossSpec,
    obj: Objective,
    result: EngineResult,
    i: int,
    loss_value: Callable[[Objective], float],
) -> ParityLoss:
    """Loss ``i`` of the engine run as parity needs it: ‖∂L/∂W‖ from its row norms (the
    entropy bonus included, as in the losses' own reports)."""
    norms = result.rows[i].norms
    return ParityLoss(
        name=spec.name,
        loss=loss_value(obj),  # the bonus from pass 1's H_t included, and a distillation term
        grad_norm=num(norms.double().norm()),
        rows=norms,
        coefficient=obj.coefficient,
        terms=obj.terms,
        metrics=terms_metrics(obj.terms, obj.agg_weights),
    )


def _agreement(
    batch: Batch,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    c: Tensor,
    result: EngineResult,
    i: int,
    rows: Tensor,
    cols: Tensor,
    tokens: Tensor,
    selection: Tensor | None,
) -> tuple[Agreement, Tensor, int]:
    """Engine against autograd: c_t and ∂L/∂z_y (normwise relative) and the row norms (against
    each row's terms, `gradlens.diagnostics.agreement`), the engine's top-entropy selection
    ``selection`` taken as given."""
    ref = autograd_reference(batch, spec, params, aggregation, selection)
    ref_at_y = ref.grad_logits.gather(-1, tokens[:, None]).squeeze(-1)  # [M]
    at_y = grad_at_y(c, result.tokens)  # the entropy bonus's E_y included, as in autograd's
    h_norm = batch.hidden[rows, cols].double().norm(dim=-1)  # [M]
    c_abs = ref.coefficient[rows, cols].double().abs()
    errors = (
        rel_err(c, ref.coefficient[rows, cols]),
        rel_err(at_y, ref_at_y),
        max_ratio(  # against each row's terms (`gradlens.diagnostics.agreement`)
            result.rows[i].norms.double() - ref.grad_weight.double().norm(dim=1),
            row_scales(ref.grad_logits.double(), c_abs, tokens, h_norm),
        ),
    )
    return (
        judged(errors, batch.weight.dtype),
        ref_at_y,
        count_non_finite(ref.grad_logits, ref.grad_weight),
    )


def _sampled_agreement(
    sample: Sample,
    batch: Batch,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    c: Tensor,
    result: EngineResult,
    i: int,
    rows: Tensor,
    cols: Tensor,
    hidden: Tensor,
    tokens: Tensor,
    selection: Tensor | None,
) -> tuple[Agreement, Tensor, int]:
    """Engine against autograd on the sample: c_t of every token, ∂L/∂z_y of the sampled
    tokens, ‖∂L/∂W_v‖ of the sampled rows (normwise relative, as `_agreement`)."""
    ref = sampled_reference(
        sample, batch, hidden, tokens, rows, cols, spec, params, aggregation, selection
    )
    at_y = grad_at_y(c, result.tokens)[sample.tokens]
    errors = (
        rel_err(c, ref.coefficient[rows, cols]),
        rel_err(at_y, ref.grad_at_y),
        max_ratio(result.rows[i].norms[sample.rows].double() - ref.row_norms, ref.row_scales),
    )
    return (
        judged(
            errors,
            batch.weight.dtype,
            scope="sampled",
            sampled_tokens=int(sample.tokens.numel()),
            sampled_rows=int(sample.rows.numel()),
        ),
        ref.grad_at_y,
        ref.non_finite,
    )
