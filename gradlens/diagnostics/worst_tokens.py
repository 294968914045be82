"""The tokens with the largest training–inference gap, and what each correction does to them.

With Δ_t = log π_old(y_t) − log μ(y_t) and ρ_t = e^{Δ_t}, the worst tokens are the top-k valid
tokens by |Δ_t| (ties: the earlier token first). Each carries π_old, μ, Δ, ρ, its sequence and
its position among the sequence's valid (completion) tokens, the decoded token with context
when a tokenizer is known (gradlens.diagnostics.token_text), and for each correction of
`probe_corrections` its weight w_t (gradlens.losses.corrections, on the whole batch: a sequence
correction sees the token's whole sequence) and its action:

    masked      w_t = 0 and the token is in the correction's region (rejected)
    truncated   in the region with w_t ≠ 0 (the weight was clamped)
    kept        outside the region (w_t = ρ_t, ρ_seq or 1, as the kind weighs)

The corrections probed are the run's own (every loss's ``loss.corrections``, once each), then
the frameworks' defaults of the kinds it does not configure (`DEFAULT_PROBES`): TIS with cap 2
(verl's rollout_is_threshold), MIS 3 and sequence MIS 3 (TRL's vllm_importance_sampling_cap),
IcePop [0.5, 5] (OpenRLHF, NeMo RL's reference bounds), the geometric sequence mask
[0.999, 1.001] (verl's seq_mean_k1 example) and verl's token_k3 rejection, which has no default:
gradlens probes it at k3 ≤ 0.005, where k3 ≈ ½Δ² keeps |Δ| ≲ 0.1, about ρ ∈ [0.9, 1.1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.diagnostics.numbers import num
from gradlens.diagnostics.token_text import TokenTexts
from gradlens.losses.base import Correction
from gradlens.losses.corrections import KINDS, correction_weight, with_defaults
from gradlens.results import CorrectionEffect, WorstToken

TOKEN_K3_PROBE = 0.005  # k3 ≈ ½Δ² ≤ 0.005 ⇔ |Δ| ≲ 0.1

DEFAULT_PROBES: tuple[Correction, ...] = (
    with_defaults("token_tis", None, None),
    with_defaults("token_mis", None, None),
    with_defaults("icepop", None, None),
    with_defaults("seq_mis", None, None),
    with_defaults("geo_mask", None, None),
    Correction("token_k3", None, TOKEN_K3_PROBE),
)


def probe_corrections(configured: tuple[Correction, ...]) -> tuple[Correction, ...]:
    """The run's corrections (duplicates once), then the defaults of the kinds it lacks."""
    own: list[Correction] = []
    for c in configured:
        if c not in own:
            own.append(c)
    kinds = {c.kind for c in own}
    return (*own, *(c for c in DEFAULT_PROBES if c.kind not in kinds))


def _g(x: float) -> str:
    return f"{x:g}"


def correction_label(c: Correction) -> str:
    """``kind[low, high]``, ``kind≤high`` or ``kind≥low``, with the batch normalisation."""
    if c.low is not None and c.high is not None:
        bounds = f"[{_g(c.low)},{_g(c.high)}]"
    elif c.high is not None:
        bounds = f"≤{_g(c.high)}"
    elif c.low is not None:
        bounds = f"≥{_g(c.low)}"
    else:
        bounds = ""
    return c.kind + bounds + ("/mean" if c.batch_normalize else "")


def _effects(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, corrections: tuple[Correction, ...]
) -> list[tuple[str, Tensor, Tensor]]:
    """(label, [N, T] weight, [N, T] region) of each correction on the whole batch."""
    inputs = TokenInputs(
        logp=old_logp,
        old_logp=old_logp,
        advantages=torch.zeros_like(old_logp),
        mask=mask,
        rollout_logp=rollout_logp,
    )
    out = []
    for c in corrections:
        weight, regions = correction_weight(inputs, c)
        out.append((correction_label(c), weight, regions[KINDS[c.kind].region]))
    return out


def worst_tokens(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    k: int,
    corrections: tuple[Correction, ...],
    texts: TokenTexts | None = None,
) -> list[WorstToken]:
    """The module docstring's top-``k`` tokens of [N, T] ``old_logp``/``rollout_logp``."""
    old = torch.where(mask, old_logp.double(), 0.0).cpu()
    roll = torch.where(mask, rollout_logp.double(), 0.0).cpu()
    mask = mask.cpu()
    delta = old - roll
    valid = mask & torch.isfinite(delta)
    if not bool(valid.any()):
        return []
    size = torch.where(valid, delta.abs(), -1.0).flatten()
    order = torch.sort(size, descending=True, stable=True).indices[: min(k, int(valid.sum()))]
    rank = torch.cumsum(mask.long(), -1) - 1  # position among the sequence's valid tokens
    effects = _effects(old, roll, valid, corrections)
    width = mask.shape[1]
    out = []
    for flat in order.tolist():
        n, t = divmod(flat, width)
        d = float(delta[n, t])
        items = []
        for label, weight, region in effects:
            w = float(weight[n, t])
            action = "kept" if not bool(region[n, t]) else "masked" if w == 0.0 else "truncated"
            items.append(CorrectionEffect(correction=label, weight=num(w), action=action))
        out.append(
            WorstToken(
                sequence=n,
                position=int(rank[n, t]),
                old_prob=float(old[n, t].exp()),
                rollout_prob=float(roll[n, t].exp()),
                log_diff=d,
                rho=num(torch.tensor(d, dtype=torch.float64).exp()),
                token=None if texts is None else texts.token(n, t),
                context=None if texts is None else texts.context(n, t),
                corrections=items,
            )
        )
    return out
