"""Whole-model gradients of each loss, and the seed post's grad-norm estimate tested on them.

For a batch from the model source, or from a batch file whose hidden states a checkpoint
recomputes (``source.model_path`` with ``source.whole_model``), each loss is run through the
whole model (the loss is `gradlens.grads.objective`, as everywhere) and its gradient is reduced
to norms per tensor group: the input embedding, each transformer block, every other module (the
final norm, position embeddings) by name, and the lm_head; plus the total norm over all
parameters, which is the ``grad_norm`` a trainer logs before clipping.

How it runs (`ModelPass` in the report): the losses share each forward — one forward with
autograd, then one backward per loss through the same graph. The sequences go through in
micro-batches planned for the memory budget (`gradlens.sources.microbatch`): the forward of a
micro-batch keeps its activations and the [m, V] logit path of its m loss tokens only. In a
micro-batch the log-probs of the other sequences are the batch's own (``tokens.logp``, without
a graph), so each micro-batch's backward gives its share Σ_{t ∈ b} (∂L/∂ℓ_t)·∂ℓ_t/∂θ of the
whole batch's gradient, and the shares add up to it exactly. The norms are taken parameter by
parameter as the backward completes each gradient (a hook after accumulation, which frees the
gradient), so no loss's whole gradient is ever held — unless the batch needs more than one
micro-batch: then each loss's gradient is summed over the micro-batches first, and as many
losses share the forwards as the budget has room for their sums; the others take their own.

The lm_head enters the forward as a separate leaf W' of its weight (the batch's own copy of
it, which holds the same values, so no third copy is made), so its gradient is the logit path
alone, ∂L/∂W = Σ_t G_t h_tᵀ — the quantity the lm_head diagnostics compute in
closed form. With tied embeddings (one tensor for the input embedding and the lm_head) a
trainer's ``.grad`` of that tensor is the sum of both paths; it is reported separately
(``tied_grad_norm``), and the total norm counts the shared tensor once, with the summed
gradient, exactly as ``torch.nn.utils.clip_grad_norm_`` sees it.

The seed post's estimate (docs/losses.md#the-seed-post: "grad-norm ≈ |Â|·(1 − π_y)", with
π_y ≈ e^(−H) for a peaked policy and π_y ≈ e^(−CE) for SFT):

    SFT (g_t = −1 on every token)        ‖∇L‖ ≈ 1 − e^(−CE),  CE = mean_t −log π_θ(y_t)
    policy-gradient losses (g ∝ A)       ‖∇L‖ ≈ mean|Â|·(1 − e^(−H)),  H = mean_t H(π_θ,t)

is set beside the measured total norm, with measured/predicted; a factor beyond
`PREDICTION_FACTOR` either way is reported as a finding. The per-token quantity the estimate
starts from, mean_t |g_t|·(1 − π_θ(y_t)), is reported too, to tell apart the step
π_y ≈ e^(−H) from the step "per-token sampled-logit gradient ≈ whole-model norm".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.compare.records import TokenSummary
from gradlens.containers import Batch, ModelContext, Teacher, valid_index
from gradlens.diagnostics.numbers import num
from gradlens.grads import (
    PolicyPass,
    distill_teacher,
    objective,
    on_grid,
    policy_entropy,
    policy_pass,
    replayed_ids,
)
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.losses.distill import token_value
from gradlens.memory import release_free_memory
from gradlens.progress import report as report_progress
from gradlens.results import (
    PREDICTION_FACTOR,
    GradGroup,
    GradNormPrediction,
    LossReport,
    ModelGradients,
    ModelPass,
    SftOverRl,
)
from gradlens.sources.forward import block_list, final_hidden, grid_with, head_weight, subset
from gradlens.sources.microbatch import (
    MicroBatchPlan,
    loss_tokens,
    plan_micro_batches,
    probe,
    sequence_bytes,
)

SQUARE_CHUNK = 1 << 22  # elements squared at a time in float64


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


def square_sum(t: Tensor) -> float:
    """Σ t² in float64, a chunk at a time (no float64 copy of a large tensor)."""
    flat = t.reshape(-1)
    return sum(float(c.double().pow(2).sum()) for c in flat.split(SQUARE_CHUNK))


def norm(tensors: list[Tensor | None]) -> float:
    return math.sqrt(sum(square_sum(t) for t in tensors if t is not None))


class _Sink:
    """Receives each parameter's gradient from the backward and keeps only what is needed.

    ``squares[loss][key]``: ‖g‖² of each parameter once its gradient is complete; with tied
    embeddings also ``"tied"`` = ‖g_W'[:, :H] + g_emb‖² and ``"bias"`` = ‖g_W'[:, H:]‖² (the
    two gradients of the shared tensor wait for each other). Between micro-batches the
    gradients are summed in ``partial``.
    """

    def __init__(self, emb: nn.Parameter, head: Tensor, tied: bool) -> None:
        self.emb_key, self.head_key = id(emb), id(head)
        self.hidden_size = int(emb.shape[1])
        self.tied = tied
        self.loss = ""
        self.final = True
        self.partial: dict[str, dict[int, Tensor]] = {}
        self.held: dict[str, dict[int, Tensor]] = {}
        self.squares: dict[str, dict[int | str, float]] = {}

    def receive(self, p: Tensor) -> None:
        g = p.grad
        p.grad = None
        if g is None:
            return
        key = id(p)
        partial = self.partial.setdefault(self.loss, {})
        if key in partial:
            g = partial.pop(key).add_(g)
        if not self.final:
            partial[key] = g
            return
        self._finish(key, g)

    def _finish(self, key: int, g: Tensor) -> None:
        squares = self.squares.setdefault(self.loss, {})
        if not self.tied or key not in (self.emb_key, self.head_key):
            squares[key] = square_sum(g)
            return
        held = self.held.setdefault(self.loss, {})
        other = self.emb_key if key == self.head_key else self.head_key
        held[key] = g
        if other in held:
            self._tied(squares, held.pop(self.head_key), held.pop(self.emb_key))

    def _tied(self, squares: dict[int | str, float], g_head: Tensor, g_emb: Tensor | None) -> None:
        squares[self.head_key] = square_sum(g_head)
        h = self.hidden_size
        shared = g_head[:, :h] if g_emb is None else g_head[:, :h] + g_emb
        squares["tied"] = square_sum(shared)
        squares["bias"] = square_sum(g_head[:, h:])
        if g_emb is not None:
            squares[self.emb_key] = square_sum(g_emb)

    def flush(self) -> None:
        """Finish a tied pair of which one half received no gradient."""
        for loss, held in self.held.items():
            squares = self.squares.setdefault(loss, {})
            if self.head_key in held:
                self._tied(squares, held.pop(self.head_key), held.pop(self.emb_key, None))
            elif self.emb_key in held:
                squares[self.emb_key] = square_sum(held.pop(self.emb_key))
                squares["tied"] = squares[self.emb_key]


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
    plan, per_forward = gradient_plan(
        loss_tokens(mask),
        probe(model, seqs, ctx.temperature, bias),
        batch.vocab_size,
        budget_bytes,
        len(names),
        sum(p.numel() * p.element_size() for p in [*flat, head]),
    )
    loss_groups = [names[i : i + per_forward] for i in range(0, len(names), per_forward)]
    kept = replayed_ids(batch)  # [N, T, K]: a replayed batch's logit paths on its kept sets
    specs = [get_loss(name) for name in names]
    rows_all, cols_all = valid_index(mask)
    entropy_grid = on_grid(tokens.entropy, rows_all, cols_all, mask.shape)  # [N, T] H_t

    release_free_memory()  # before the forward that keeps the activations
    sink = _Sink(emb, head, tied)
    handles = [p.register_post_accumulate_grad_hook(sink.receive) for p in [*flat, head]]
    total_backwards = len(names) * len(plan.groups)
    done = 0
    try:
        for group in loss_groups:
            for b, rows in enumerate(plan.groups):
                with torch.enable_grad():
                    part = subset(seqs, rows)
                    hidden = final_hidden(model, part, ctx.temperature, bias)[:, ctx.offset :]
                    assert hidden.shape[:2] == mask[rows].shape, (hidden.shape, mask.shape)
                    policy = policy_pass(
                        hidden,
                        head,
                        batch.tokens[rows],
                        mask[rows],
                        None if kept is None else kept[rows],
                    )
                    logp = policy.logp
                    entropy = policy_entropy(policy, specs, params)
                    divergence = micro_divergence(batch, params, rows, policy)
                    if not plan.single:
                        logp = grid_with(tokens.logp, rows, logp)
                        if entropy is not None:
                            entropy = grid_with(entropy_grid, rows, entropy)
                        if divergence is not None:  # the other rows' D_t: constants, 0 here
                            zeros = torch.zeros(mask.shape, dtype=divergence.dtype)
                            divergence = grid_with(zeros.to(divergence.device), rows, divergence)
                    for j, name in enumerate(group):
                        report_progress("model grads", done, total_backwards)
                        loss = objective(
                            batch, logp, get_loss(name), params, aggregation, entropy, divergence
                        ).loss
                        sink.loss, sink.final = name, b == len(plan.groups) - 1
                        loss.backward(retain_graph=j < len(group) - 1)
                        done += 1
                del policy, logp, entropy, hidden, divergence
        sink.flush()
    finally:
        for h in handles:
            h.remove()
    report_progress("model grads", total_backwards, total_backwards)
    model_pass = ModelPass(
        name="whole-model gradients",
        micro_batches=len(plan.groups),
        forwards=len(loss_groups) * len(plan.groups),
        backwards=total_backwards,
        checkpointed=False,
        budget_bytes=plan.budget_bytes,
        bytes_per_sequence=plan.bytes_per_sequence,
        over_budget=plan.over_budget,
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


def post_estimates(
    batch: Batch,
    tokens: TokenSummary,
    params: LossParams,
    aggregation: Aggregation,
    names: list[str],
) -> dict[str, GradNormPrediction]:
    """The estimate of each loss it applies to (not yet judged against a measurement)."""
    mask = batch.mask
    if tokens.sampled_probs.numel() == 0:
        return {}
    ce = float(-tokens.logp[mask].double().mean())
    entropy = float(tokens.entropy.double().mean())
    adv = float(batch.advantages[mask].double().abs().mean())
    sampled = tokens.sampled_probs.double()  # [M] π_θ(y_t)
    rows, cols = valid_index(mask)
    token_entropy = on_grid(tokens.entropy, rows, cols, mask.shape)  # [N, T] H_t
    out = {}
    for name in names:
        spec = get_loss(name)
        terms = objective(batch, tokens.logp, spec, params, aggregation, token_entropy).terms
        g = terms.per_token_grad[mask].double()  # [M] g_t before aggregation
        per_token = float((g.abs() * (1 - sampled)).mean())
        if bool((g == -1).all()):
            formula, value, text = "1 − e^(−CE)", 1 - math.exp(-ce), f"CE = {ce:.4g} nats"
        elif spec.uses_advantage:
            formula = "mean|Â|·(1 − e^(−H))"
            value = adv * (1 - math.exp(-entropy))
            text = f"mean|Â| = {adv:.4g}, H = {entropy:.4g} nats"
        else:
            continue
        out[name] = GradNormPrediction(
            formula=formula,
            inputs=text,
            predicted=num(value),
            measured=None,
            ratio=None,
            per_token=num(per_token),
            threshold=PREDICTION_FACTOR,
            agrees=False,
        )
    return out


def judge(prediction: GradNormPrediction, measured: float) -> GradNormPrediction:
    ratio = measured / prediction.predicted if prediction.predicted else math.inf
    agrees = bool(1 / PREDICTION_FACTOR <= ratio <= PREDICTION_FACTOR)
    return prediction.model_copy(
        update={"measured": num(measured), "ratio": num(ratio), "agrees": agrees}
    )


def sft_over_rl(per_loss: dict[str, ModelGradients]) -> list[SftOverRl]:
    """SFT's norm over each policy-gradient loss's: the estimate's ratio and the measured one."""
    sft = [n for n, m in per_loss.items() if m.prediction and m.prediction.formula.startswith("1")]
    rl = [n for n, m in per_loss.items() if m.prediction and n not in sft]
    out = []
    for s in sft[:1]:
        for r in rl:
            ps, pr = per_loss[s].prediction, per_loss[r].prediction
            assert ps is not None and pr is not None
            ms, mr = per_loss[s].total_norm, per_loss[r].total_norm
            out.append(
                SftOverRl(
                    sft=s,
                    rl=r,
                    predicted=num(ps.predicted / pr.predicted)
                    if ps.predicted and pr.predicted
                    else None,
                    measured=num(ms / mr) if ms and mr else None,
                )
            )
    return out
