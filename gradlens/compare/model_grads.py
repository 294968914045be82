"""Whole-model gradients of each loss, and the seed post's grad-norm estimate tested on them.

For a batch from the model source, or from a batch file whose hidden states a checkpoint
recomputes (``source.model_path`` with ``source.whole_model``), each loss is run through the
whole model (one forward with autograd at θ over every sequence, one backward per loss; the loss
is `gradlens.grads.objective`, as everywhere) and its gradient is reduced to norms per tensor
group:
the input embedding, each transformer block, every other module (the final norm, position
embeddings) by name, and the lm_head; plus the total norm over all parameters, which is the
``grad_norm`` a trainer logs before clipping.

The lm_head enters the forward as a separate copy W' of its weight, so its gradient is the
logit path alone, ∂L/∂W = Σ_t G_t h_tᵀ — the quantity the lm_head diagnostics compute in
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

import math
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.compare.records import TokenSummary
from gradlens.containers import Batch, ModelContext, valid_index
from gradlens.diagnostics.numbers import num
from gradlens.grads import objective, on_grid, policy_entropy, policy_pass, replayed_ids
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.progress import report as report_progress
from gradlens.results import (
    PREDICTION_FACTOR,
    GradGroup,
    GradNormPrediction,
    LossReport,
    ModelGradients,
    SftOverRl,
)
from gradlens.sources.forward import final_hidden, head_weight


def block_list(model: nn.Module) -> tuple[str, int] | None:
    """(module path, count) of the list of transformer blocks, if one is found."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (layers is None or len(module) == layers):
            return name, len(module)
    return None


def parameter_groups(model: Any) -> list[tuple[str, list[nn.Parameter]]]:
    """Named groups of the parameters the forward uses, the lm_head weight excluded."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = {id(head.weight), id(getattr(head, "bias", None))} - {id(emb)}
    blocks = block_list(model)
    groups: dict[str, list[nn.Parameter]] = {"embedding": [emb] if emb.requires_grad else []}
    if blocks is not None:
        for i in range(blocks[1]):
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


def norm(tensors: list[Tensor | None]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors if t is not None))


def model_gradients(
    batch: Batch,
    ctx: ModelContext,
    tokens: TokenSummary,
    reports: list[LossReport],
    params: LossParams,
    aggregation: Aggregation,
) -> tuple[list[SftOverRl], list[LossReport]]:
    """Whole-model gradients and the estimate for each loss: the SFT-over-RL comparison and
    the loss reports with their ``model_grads`` and findings."""
    model = ctx.loaded.model
    bias = ctx.loaded.bias
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    hidden_size = int(emb.shape[1])
    groups = parameter_groups(model)
    flat = [p for _, ps in groups for p in ps]

    head = head_weight(model).detach().clone().requires_grad_(True)  # W': the logit path
    hidden = final_hidden(model, ctx.sequences, ctx.temperature, bias)[:, ctx.offset :]
    assert hidden.shape[:2] == batch.mask.shape, (hidden.shape, batch.mask.shape)
    policy = policy_pass(hidden, head, batch.tokens, batch.mask, replayed_ids(batch))
    entropy = policy_entropy(policy, [get_loss(r.name) for r in reports], params)

    estimates = post_estimates(batch, tokens, params, aggregation, [r.name for r in reports])
    results: list[LossReport] = []
    per_loss: dict[str, ModelGradients] = {}
    for i, r in enumerate(reports):
        report_progress("model grads", i, len(reports))
        spec = get_loss(r.name)
        loss = objective(batch, policy.logp, spec, params, aggregation, entropy).loss
        grads = torch.autograd.grad(loss, [*flat, head], retain_graph=True, allow_unused=True)
        by_param = dict(zip(map(id, flat), grads[:-1], strict=True))
        g_head = grads[-1]
        entries = []
        for name, ps in groups:
            entries.append(
                GradGroup(
                    name=name,
                    parameters=sum(p.numel() for p in ps),
                    norm=num(norm([by_param[id(p)] for p in ps])),
                )
            )
        entries.append(GradGroup(name="lm_head", parameters=head.numel(), norm=num(norm([g_head]))))
        tied_norm = None
        others = [by_param[id(p)] for p in flat if p is not emb]
        g_emb = by_param.get(id(emb))
        if tied:
            assert g_head is not None
            shared = g_head[:, :hidden_size] + (g_emb if g_emb is not None else 0)
            tied_norm = norm([shared])
            total = norm([*others, shared, g_head[:, hidden_size:]])
        else:
            total = norm([*others, g_emb, g_head])
        prediction = estimates.get(r.name)
        if prediction is not None:
            prediction = judge(prediction, total)
        mg = ModelGradients(
            total_norm=num(total),
            groups=entries,
            lm_head_logit_path=num(norm([g_head])),
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
                f"embedding gradient (‖.grad‖ = {tied_norm:.3g} against {norm([g_head]):.3g} "
                "through the logits alone)"
            )
        results.append(r.model_copy(update={"model_grads": mg, "findings": notes}))
    report_progress("model grads", len(reports), len(reports))
    return sft_over_rl(per_loss), results


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
