"""The seed post's grad-norm estimate, set beside the measured whole-model norm.

The estimate (docs/losses.md#the-seed-post: "grad-norm ≈ |Â|·(1 − π_y)", with π_y ≈ e^(−H)
for a peaked policy and π_y ≈ e^(−CE) for SFT):

    SFT (g_t = −1 on every token)        ‖∇L‖ ≈ 1 − e^(−CE),  CE = mean_t −log π_θ(y_t)
    policy-gradient losses (g ∝ A)       ‖∇L‖ ≈ mean|Â|·(1 − e^(−H)),  H = mean_t H(π_θ,t)

is set beside the measured total norm, with measured/predicted; a factor beyond
`PREDICTION_FACTOR` either way is reported as a finding. The per-token quantity the estimate
starts from, mean_t |g_t|·(1 − π_θ(y_t)), is reported too, to tell apart the step
π_y ≈ e^(−H) from the step "per-token sampled-logit gradient ≈ whole-model norm".
"""

from __future__ import annotations

import math

from gradlens.compare.records import TokenSummary
from gradlens.containers import Batch
from gradlens.diagnostics.numbers import num
from gradlens.grads import objective
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.results import PREDICTION_FACTOR, GradNormPrediction, ModelGradients, SftOverRl


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
    token_entropy = tokens.entropy_grid(mask)  # [N, T] H_t
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
    """The measured norm against the estimate: within `PREDICTION_FACTOR`, or both zero (a
    zero gradient, every advantage 0, is what the estimate says too: no ratio, agreement)."""
    if not prediction.predicted and measured == 0.0:
        return prediction.model_copy(update={"measured": 0.0, "ratio": None, "agrees": True})
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
