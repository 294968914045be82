"""Whole-model gradients of each loss, and the seed post's grad-norm estimate tested on them.

For a batch from the model source, or from a batch file whose hidden states a checkpoint
recomputes (``source.model_path`` with ``source.whole_model``), each loss is run through the
whole model (the loss is `gradlens.grads.objective`, as everywhere) and its gradient is reduced
to norms per tensor group: the input embedding, each transformer block, every other module (the
final norm, position embeddings) by name, and the lm_head; plus the total norm over all
parameters, which is the ``grad_norm`` a trainer logs before clipping.

How it runs (`ModelPass` in the report): the losses share each forward. Where the model can be
cut at its transformer blocks (`gradlens.sources.blockwise`), the forward records each block's
input, and the backward goes one block at a time, each block recomputed once for all the
losses (``checkpointed``); otherwise the forward keeps the whole graph and each loss has its
own backward through it. When every loss reads the logits only through ℓ_t and the whole batch
goes through at once, the logit path is differentiated once for all of them
(`gradlens.compare.logp_tail`): each loss's c_k = ∂L_k/∂ℓ by autograd of the objective on ℓ,
the cotangents at the final hidden states c_k·d from one product, and of the lm_head's
gradient its squared norm and tied rows from Gram matrices over the tokens. The sequences go through
in micro-batches planned for the memory budget (`gradlens.sources.microbatch`). In a micro-batch the
log-probs of the other sequences are the batch's own (``tokens.logp``, without a graph), so each
micro-batch's backward gives its share Σ_{t ∈ b} (∂L/∂ℓ_t)·∂ℓ_t/∂θ of the whole batch's gradient,
and the shares add up to it exactly. The norms are taken parameter by parameter as each gradient is
complete (`gradlens.compare.gradient_norms`), so no loss's whole gradient is ever held — unless the
batch needs more than one micro-batch: then each loss's gradient is summed over the micro-batches
first, and as many losses share the forwards as the budget has room for their sums; the others take
their own.

The lm_head enters the forward as a separate leaf W' of its weight (the batch's own copy of
it, which holds the same values, so no third copy is made), so its gradient is the logit path
alone, ∂L/∂W = Σ_t G_t h_tᵀ — the quantity the lm_head diagnostics compute in
closed form. With tied embeddings (one tensor for the input embedding and the lm_head) a
trainer's ``.grad`` of that tensor is the sum of both paths; it is reported separately
(``tied_grad_norm``), and the total norm counts the shared tensor once, with the summed
gradient, exactly as ``torch.nn.utils.clip_grad_norm_`` sees it. Each measured total norm is
set beside the seed post's estimate (`gradlens.compare.grad_norm_estimate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.compare.grad_norm_estimate import judge, post_estimates, sft_over_rl
from gradlens.compare.gradient_norms import GradientSink
from gradlens.compare.logp_tail import LogpTail, cheaper, logp_tail
from gradlens.compare.records import TokenSummary
from gradlens.containers import Batch, BlockTape, ModelContext, Teacher
from gradlens.diagnostics.numbers import num
from gradlens.grads import (
    PolicyPass,
    distill_teacher,
    objective,
    on_grid,
    policy_entropy,
    policy_pass,
    reads_entropy,
    replayed_ids,
)
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.losses.distill import token_value
from gradlens.memory import release_free_memory
from gradlens.progress import report as report_progress
from gradlens.results import (
    PREDICTION_FACTOR,
    GradGroup,
    LossReport,
    ModelGradients,
    ModelPass,
    SftOverRl,
)
from gradlens.sources.blockwise import (
    BlockwiseUnsupported,
    backward_blocks,
    replayed_blocks,
    taped_blocks,
)
from gradlens.sources.forward import (
    block_list,
    final_hidden,
    grid_with,
    head_weight,
    row_gradient_embedding,
)
from gradlens.sources.microbatch import (
    MicroBatchPlan,
    checkpointed_bytes,
    loss_tokens,
    plan_micro_batches,
    probe,
    sequence_bytes,
)
from gradlens.sources.shared_prefix import pass_positions


def parameter_groups(model: Any) -> list[tuple[str, list[nn.Parameter]]]:
    """Named groups of the parameters the forward uses, the lm_head weight excluded."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = {id(head.weight), id(getattr(head, "bias", None))} - {id(emb)}
    blocks = block_list(model)
    groups: dict[str, list[nn.Parameter]] = {"embedding": [emb] if emb.requires_grad else []}
    if blocks is not None:
        for i in range(len(blocks[1])):
            groups[f"block {i}"] = []
    for name, p in model.named_parameters():
        if p is emb or id(p) in skip or not p.requires_grad:
            continue
        key = name.rsplit(".", 1)[0]
        if blocks is not None and name.startswith(blocks[0] + "."):
            key = f"block {name[len(blocks[0]) + 1 :].split('.')[0]}"
        groups.setdefault(key, []).append(p)
    return [(k, v) for k, v in groups.items() if v]


def _g(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def gradient_plan(
    tokens: list[int],
    per_sequence: int,
    vocab: int,
    budget_bytes: int,
    losses: int,
    gradient_bytes: int,
) -> tuple[MicroBatchPlan, int]:
    """The micro-batches and how many losses share each forward, for the fewest forwards.

    The whole batch in one micro-batch when it fits: one forward, every loss's backward through
    it, no summed gradient kept. Otherwise each loss sharing the forwards keeps its gradient
    summed over the micro-batches (``gradient_bytes`` each), so k sharing losses leave
    budget − k·gradient_bytes to the micro-batches, which must hold the largest sequence; of
    those k, the one with the fewest forwards, ⌈losses/k⌉·micro-batches, wins (the larger k on
    a tie). When no k leaves room for the largest sequence, one loss at a time, over budget.
    """
    whole = plan_micro_batches(tokens, per_sequence, vocab, budget_bytes)
    if whole.single:
        return whole, losses
    largest = max(sequence_bytes(per_sequence, vocab, m) for m in tokens)
    best: tuple[int, MicroBatchPlan, int] | None = None
    for k in range(losses, 0, -1):
        room = budget_bytes - k * gradient_bytes
        if room < largest:
            continue
        plan = plan_micro_batches(tokens, per_sequence, vocab, room)
        forwards = -(-losses // k) * len(plan.groups)
        if best is None or forwards < best[0]:
            best = (forwards, plan, k)
    if best is None:
        return whole, 1
    return best[1], best[2]


def logit_path_weight(batch: Batch, model: Any) -> Tensor:
    """W', the lm_head weight as a leaf of its own (module docstring): the batch's copy of it
    (the model source and the recomputed batch copy `head_weight` after the stale steps, so
    it holds the same values) without another copy, else a copy of the model's."""
    weight = head_weight(model).detach()
    own = batch.weight
    if own.shape == weight.shape and own.dtype == weight.dtype and torch.equal(own, weight):
        return own.detach().requires_grad_(True)
    return weight.clone().requires_grad_(True)


def micro_divergence(
    batch: Batch, params: LossParams, rows: list[int], policy: PolicyPass
) -> Tensor | None:
    """[n, T] the distillation term's D_t of the micro-batch ``rows``, differentiable through
    its log-probs (the whole model's gradient carries the term as the lm_head's does); None
    without ``loss.distill``. Its weights a_t do not depend on D_t, so the other rows' D_t
    are constants of no gradient."""
    if params.distill is None or batch.teacher is None:
        return None
    index = torch.tensor(rows, device=batch.mask.device)
    teacher = batch.teacher

    def pick(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[index]

    part = Teacher(
        hidden=pick(teacher.hidden),
        weight=teacher.weight,
        bias=teacher.bias,
        logits=pick(teacher.logits),
        topk_ids=pick(teacher.topk_ids),
        topk_logp=pick(teacher.topk_logp),
        sampled_logp=pick(teacher.sampled_logp),
    )
    micro = dataclasses.replace(batch, teacher=part, mask=batch.mask[index])
    at = distill_teacher(micro, params, policy.rows, policy.cols)
    values = token_value(policy.log_probs, at, params.distill)  # [m]
    return on_grid(values, policy.rows, policy.cols, micro.mask.shape)


def cut_blocks(model: Any, ctx: ModelContext) -> list[nn.Module] | None:
    """The transformer blocks when the backward can go one block at a time, else None: the
    parameters allow the cut, and a taped forward of one sequence (without autograd) finds
    nothing against it (`gradlens.sources.blockwise`), before the memory is planned. A tape
    the stale steps recorded (``ctx.tape``) is such a forward, of every sequence: its blocks."""
    if ctx.tape is not None:
        return ctx.tape.blocks
    try:
        with torch.no_grad(), taped_blocks(model) as tape:
            final_hidden(model, ctx.sequences.select([0]), ctx.temperature, ctx.loaded.bias)
    except BlockwiseUnsupported:
        return None
    return tape.blocks


class _MicroLosses:
    """The losses of one micro-batch, from a forward through the model (module docstring)."""

    def __init__(
        self,
        batch: Batch,
        ctx: ModelContext,
        tokens: TokenSummary,
        head: Tensor,
        params: LossParams,
        aggregation: Aggregation,
        single: bool,
    ) -> None:
        self.batch, self.ctx, self.tokens, self.head = batch, ctx, tokens, head
        self.params, self.aggregation, self.single = params, aggregation, single
        self.kept = replayed_ids(batch)  # [N, T, K]: a replayed batch's kept sets
        self.entropy_grid = tokens.entropy_grid(batch.mask)  # [N, T]

    def _hidden(self, rows: list[int]) -> Tensor:
        """[n, T, H'] the final hidden states of the sequences ``rows``, with autograd."""
        ctx = self.ctx
        with torch.enable_grad():
            part = ctx.sequences.select(rows)
            hidden = final_hidden(ctx.loaded.model, part, ctx.temperature, ctx.loaded.bias)
            hidden = hidden[:, ctx.offset :]
        grid = self.batch.mask[rows].shape
        assert hidden.shape[:2] == grid, (hidden.shape, grid)
        return hidden

    def through_logp(self, names: list[str]) -> bool:
        """Whether `tail` serves the losses ``names``: one micro-batch, the logits read only
        through ℓ_t (no replayed kept sets, no entropy bonus, no distillation term) and
        `gradlens.compare.logp_tail.cheaper` than autograd."""
        specs = [get_loss(name) for name in names]
        bonus = reads_entropy(specs, self.params) and self.params.entropy_coef != 0.0
        distill = self.params.distill is not None and self.batch.teacher is not None
        if not self.single or self.kept is not None or bonus or distill:
            return False
        head = self.head.shape
        return cheaper(int(self.batch.mask.sum()), len(names), int(head[1]), int(head[0]))

    def tail(
        self, rows: list[int], names: list[str], head_rows: Tensor | None, hidden_size: int
    ) -> tuple[Tensor, LogpTail]:
        """The final hidden states of the sequences ``rows`` (their graph kept) and the
        `LogpTail` of the losses ``names`` on them, each c_k = ∂L_k/∂ℓ by autograd of
        `objective` on ℓ alone (`through_logp` holds)."""
        batch, mask = self.batch, self.batch.mask
        specs = [get_loss(name) for name in names]
        hidden = self._hidden(rows)
        head = self.head.detach()
        with torch.no_grad():
            policy = policy_pass(hidden.detach(), head, batch.tokens[rows], mask[rows])
            entropy = policy_entropy(policy, specs, self.params)  # detached: no bonus here
        logp = policy.logp.detach().requires_grad_(True)
        coefficients = []
        for spec in specs:
            with torch.enable_grad():
                loss = objective(batch, logp, spec, self.params, self.aggregation, entropy).loss
                (c,) = torch.autograd.grad(loss, logp, allow_unused=True)
            c = torch.zeros_like(logp) if c is None else c
            coefficients.append(c[policy.rows, policy.cols])
        return hidden, logp_tail(policy, head, coefficients, hidden.shape, hidden_size, head_rows)

    def losses(self, rows: list[int], names: list[str]) -> list[Tensor]:
        """L_k of the sequences ``rows`` (the whole batch's loss, differentiable in them)."""
        batch, mask = self.batch, self.batch.mask
        specs = [get_loss(name) for name in names]
        hidden = self._hidden(rows)
        with torch.enable_grad():
            policy = policy_pass(
                hidden,
                self.head,
                batch.tokens[rows],
                mask[rows],
                None if self.kept is None else self.kept[rows],
                keep_logits=False,
            )
            logp = policy.logp
            entropy = policy_entropy(policy, specs, self.params)
            divergence = micro_divergence(batch, self.params, rows, policy)
            if not self.single:
                logp = grid_with(self.tokens.logp, rows, logp)
                if entropy is not None:
                    entropy = grid_with(self.entropy_grid, rows, entropy)
                if divergence is not None:  # the other rows' D_t: constants, 0 here
                    zeros = torch.zeros(mask.shape, dtype=divergence.dtype)
                    divergence = grid_with(zeros.to(divergence.device), rows, divergence)
            return [
                objective(
                    batch, logp, spec, self.params, self.aggregation, entropy, divergence
                ).loss
                for spec in specs
            ]


def _backward_whole(
    micro: _MicroLosses,
    rows: list[int],
    names: list[str],
    leaves: list[Tensor],
    sink: GradientSink,
    final: bool,
) -> None:
    """The whole graph kept: one backward per loss, each parameter's gradient handed to the
    sink as soon as it is accumulated (and freed)."""
    current = [""]

    def take(p: Tensor) -> None:
        g, p.grad = p.grad, None
        if g is not None:
            sink.receive(current[0], p, g, final)

    handles = [p.register_post_accumulate_grad_hook(take) for p in leaves]
    try:
        losses = micro.losses(rows, names)
        for j, (name, loss) in enumerate(zip(names, losses, strict=True)):
            current[0] = name
            loss.backward(retain_graph=j < len(losses) - 1)
    finally:
        for h in handles:
            h.remove()


def _backward_blockwise(
    micro: _MicroLosses,
    rows: list[int],
    names: list[str],
    flat: list[nn.Parameter],
    sink: GradientSink,
    final: bool,
    recorded: BlockTape | None = None,
) -> bool:
    """One block at a time (`gradlens.sources.blockwise`): the tail's gradients and the
    cotangents at the last block, every block recomputed once for all the losses, then the
    entry (the embedding). A parameter outside the blocks may be reached from the tail and the
    entry both: its two parts are summed before the sink sees it. With ``recorded``, the tape
    of an earlier forward of these sequences at these parameters, the blocks are not run
    forward again (`replayed_blocks`); returns whether they were."""
    model = micro.ctx.loaded.model
    replayed = False
    through = micro.through_logp(names)  # the logit path by `gradlens.compare.logp_tail`
    head_rows = sink.rows if sink.tied else None

    def forward() -> Any:
        if through:
            return micro.tail(rows, names, head_rows, sink.hidden_size)
        return micro.losses(rows, names)

    if recorded is not None:
        try:
            with replayed_blocks(model, recorded) as tape:
                out = forward()
            replayed = True
        except BlockwiseUnsupported:  # not the recorded forward: a forward of their own
            pass
    if not replayed:
        with taped_blocks(model) as tape:
            out = forward()
    assert tape.exit is not None and tape.entry is not None
    inside = {id(p) for block in tape.blocks for p in block.parameters()}
    outside = [p for p in flat if id(p) not in inside]
    outer: list[dict[int, Tensor]] = []
    cotangents = []
    for k, name in enumerate(names):
        last = k == len(names) - 1
        if through:
            hidden, tail = out
            at_exit, *rest = torch.autograd.grad(
                hidden, [tape.exit, *outside], grad_outputs=tail.hidden_cotangents[k],
                retain_graph=not last, allow_unused=True,
            )  # fmt: skip
            head = tail.heads[k]
            assert final, "the logp tail takes the whole batch in one micro-batch"
            sink.receive_head(name, head.weight_sq, head.bias_sq, head.rows)
        else:
            at_exit, at_head, *rest = torch.autograd.grad(
                out[k], [tape.exit, micro.head, *outside], retain_graph=not last,
                allow_unused=True,
            )  # fmt: skip
            if at_head is not None:
                sink.receive(name, micro.head, at_head, final)
        cotangents.append(torch.zeros_like(tape.exit) if at_exit is None else at_exit)
        outer.append({id(p): g for p, g in zip(outside, rest, strict=True) if g is not None})
    del out

    def receive(k: int, p: nn.Parameter, g: Tensor) -> None:
        sink.receive(names[k], p, g, final)

    at_entry = backward_blocks(tape, cotangents, receive)
    entry = tape.entry if tape.entry.requires_grad else None
    for k, (name, g) in enumerate(zip(names, at_entry, strict=True)):
        parts = outer[k]
        if entry is not None and outside:
            grads = torch.autograd.grad(
                entry, outside, grad_outputs=g, retain_graph=k < len(names) - 1,
                allow_unused=True,
            )  # fmt: skip
            for p, gp in zip(outside, grads, strict=True):
                if gp is not None:
                    key = id(p)
                    parts[key] = gp if key not in parts else parts[key] + gp
        for p in outside:
            if id(p) in parts:
                sink.receive(name, p, parts.pop(id(p)), final)
    return replayed


def model_gradients(
    batch: Batch,
    ctx: ModelContext,
    tokens: TokenSummary,
    reports: list[LossReport],
    params: LossParams,
    aggregation: Aggregation,
    budget_bytes: int,
) -> tuple[list[SftOverRl], list[LossReport], ModelPass]:
    """Whole-model gradients and the estimate for each loss: the SFT-over-RL comparison, the
    loss reports with their ``model_grads`` and findings, and how the pass ran."""
    model = ctx.loaded.model
    bias = ctx.loaded.bias
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    groups = parameter_groups(model)
    flat = [p for _, ps in groups for p in ps]
    head = logit_path_weight(batch, model)  # W': the logit path
    mask = batch.mask
    seqs = ctx.sequences
    names = [r.name for r in reports]
    blocks = cut_blocks(model, ctx)  # None: the whole graph is kept (no clean cut)
    per_sequence = ctx.sequence_bytes
    if per_sequence is None:  # not measured on these sequences yet
        per_sequence = probe(model, seqs, ctx.temperature, bias)
    if blocks is not None:
        per_sequence = checkpointed_bytes(per_sequence, model, seqs)
    plan, per_forward = gradient_plan(
        loss_tokens(mask),
        per_sequence,
        batch.vocab_size,
        budget_bytes,
        len(names),
        sum(p.numel() * p.element_size() for p in [*flat, head]),
    )
    loss_groups = [names[i : i + per_forward] for i in range(0, len(names), per_forward)]
    micro = _MicroLosses(batch, ctx, tokens, head, params, aggregation, plan.single)

    release_free_memory()  # before the forward that keeps what its backward needs
    sink = GradientSink(emb, head, tied, torch.unique(seqs.input_ids))
    total_backwards = len(names) * len(plan.groups)
    done = 0
    # the stale steps' last forward, at these parameters over these sequences: replayed when the
    # gradients take a single forward too (it recorded the whole batch)
    recorded = ctx.tape if blocks is not None and plan.single and len(loss_groups) == 1 else None
    ctx.tape = None  # its tensors are freed once used
    replayed = False
    # tied: the embedding's gradient as the rows it looked up, never a [V, H] of zeros
    with row_gradient_embedding(model):
        for group in loss_groups:
            for b, rows in enumerate(plan.groups):
                final = b == len(plan.groups) - 1
                report_progress("model grads", done, total_backwards)
                if blocks is not None:
                    replayed = _backward_blockwise(micro, rows, group, flat, sink, final, recorded)
                else:
                    _backward_whole(micro, rows, group, [*flat, head], sink, final)
                done += len(group)
    del recorded
    sink.flush()
    report_progress("model grads", total_backwards, total_backwards)
    model_pass = ModelPass(
        name="whole-model gradients",
        micro_batches=len(plan.groups),
        forwards=0 if replayed else len(loss_groups) * len(plan.groups),
        replayed_forward=replayed,
        backwards=total_backwards,
        checkpointed=blocks is not None,
        budget_bytes=plan.budget_bytes,
        bytes_per_sequence=plan.bytes_per_sequence,
        over_budget=plan.over_budget,
        **pass_positions(seqs, plan.groups),
    )

    estimates = post_estimates(batch, tokens, params, aggregation, names)
    results: list[LossReport] = []
    per_loss: dict[str, ModelGradients] = {}
    for r in reports:
        squares = sink.squares.get(r.name, {})
        entries = [
            GradGroup(
                name=name,
                parameters=sum(p.numel() for p in ps),
                norm=num(math.sqrt(sum(squares.get(id(p), 0.0) for p in ps))),
            )
            for name, ps in groups
        ]
        head_norm = math.sqrt(squares.get(id(head), 0.0))
        entries.append(GradGroup(name="lm_head", parameters=head.numel(), norm=num(head_norm)))
        others = sum(squares.get(id(p), 0.0) for p in flat if p is not emb)
        tied_norm = None
        if tied:
            tied_norm = math.sqrt(squares.get("tied", 0.0))
            total = math.sqrt(others + squares.get("tied", 0.0) + squares.get("bias", 0.0))
        else:
            total = math.sqrt(others + squares.get(id(emb), 0.0) + squares.get(id(head), 0.0))
        prediction = estimates.get(r.name)
        if prediction is not None:
            prediction = judge(prediction, total)
        mg = ModelGradients(
            total_norm=num(total),
            groups=entries,
            lm_head_logit_path=num(head_norm),
            tied=bool(tied),
            tied_grad_norm=None if tied_norm is None else num(tied_norm),
            prediction=prediction,
        )
        per_loss[r.name] = mg
        notes = list(r.findings)
        if prediction is not None and not prediction.agrees:
            notes.append(
                f"the seed post's grad-norm estimate {prediction.formula} = "
                f"{_g(prediction.predicted)} is off from the measured whole-model norm "
                f"{_g(prediction.measured)} by {_g(prediction.ratio, 4)}× (agreement: within "
                f"{PREDICTION_FACTOR:g}×); the per-token sampled-logit gradient it starts from, "
                f"mean |g|·(1 − π_y), is {_g(prediction.per_token)}"
            )
        if tied:
            notes.append(
                "tied embeddings: the lm_head's .grad in a trainer also carries the input-"
                f"embedding gradient (‖.grad‖ = {tied_norm:.3g} against {head_norm:.3g} "
                "through the logits alone)"
            )
        results.append(r.model_copy(update={"model_grads": mg, "findings": notes}))
    return sft_over_rl(per_loss), results, model_pass
