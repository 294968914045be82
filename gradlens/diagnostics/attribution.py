"""Attribution of one loss's lm_head update to sequences, tokens, loss terms and token groups,
and what one step does to the entropy (docs/attribution.md has the derivations and an example).

With g_t = ∂L/∂z_t = c_t(e_y − π_t) + w_t d_t (w_t = a_t·S_t·c_H of the entropy bonus, S_t the
top-entropy selection, d_t = π_t(log π_t + H_t)) and G = ∂L/∂W = Σ_t g_t h_tᵀ, an engine hands
over per token u_t and e_t (`gradlens.engine.attribution`: s_t = g_tᵀ G h_t = c_t u_t + w_t e_t)
and per sequence ‖G_i‖².
From them, exactly:

    token share       s_t/‖G‖²                      Σ_t = 1
    its components    c^pol_t u_t, c^KL_t u_t, w_t e_t, over ‖G‖²
                      (c^KL_t = weight_t·β∂D/∂ℓ_t, `LossTerms.penalty_grad`; c^pol = c − c^KL)
    sequence share    Σ_{t∈i} s_t/‖G‖² = ⟨G_i, G⟩/‖G‖²
    token norm        ‖g_t h_tᵀ‖_F = ‖g_t‖·‖h_t‖,
                      ‖g_t‖² = c²‖e_y − π‖² + 2cw (e_y − π)·d + w²‖d‖²
    group shares      sums of token shares over a partition of the tokens: by the sign of A, by
                      clip/mask region (a token counts in the first region it is in, in the
                      loss's order, then the corrections'; ``kept`` if none), by π_θ(y) bucket,
                      by quarter of its completion; and by loss component (every token split)

Entropy change of one step of size η, per unit η at η = 0 (the first-order term):

    lm_head step ΔW = −ηG:         dH_t/dη = d_t·(G h_t) = e_t
    logit step Δz_t = −η g_t:      dH_t/dη = d_t·g_t = c_t[(e_y − π)·d] + w_t‖d‖²
                                   = c_t[π_y(log π_y + H) − Σ_v π_v²(log π_v + H)] + w_t‖d‖²

reported as the mean over tokens and its parts by the sign of the token's advantage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch, valid_index
from gradlens.diagnostics.numbers import num
from gradlens.diagnostics.token_text import TokenTexts
from gradlens.engine.attribution import LossSums, TokenSums
from gradlens.grads import Objective, effective_old_logp
from gradlens.results.attribution import (
    AttributedSequence,
    AttributedToken,
    Attribution,
    EntropyChange,
    GroupShares,
    SharePoints,
)

POINT_LIMIT = 4096  # tokens drawn in the figure (the largest |share| ones beyond it)
PROB_BUCKETS = (("[0, 0.1)", 0.1), ("[0.1, 0.5)", 0.5), ("[0.5, 0.9)", 0.9), ("[0.9, 1]", math.inf))
QUARTERS = ("0–25%", "25–50%", "50–75%", "75–100%")
KEPT = "kept"


@dataclass(frozen=True)
class AttributionInputs:
    """What an engine gives the attribution of one loss; [M] tensors over the valid tokens in
    row-major order.

    Attributes:
        sums: the loss's u, e and per-sequence ‖G_i‖² (`gradlens.engine.attribution`).
        tokens: the per-token sums shared by every loss.
        grad_norm_sq: ‖G‖²_F (a 0-d tensor), from the engine's row norms.
        entropy: H_t.
        logp: log π_θ(y_t).
        hidden_norm: ‖h_t‖.
    """

    sums: LossSums
    tokens: TokenSums
    grad_norm_sq: Tensor
    entropy: Tensor
    logp: Tensor
    hidden_norm: Tensor


@dataclass(frozen=True)
class TokenShares:
    """The exact per-token and per-sequence numbers, in float64.

    Attributes:
        share, policy, kl, bonus: [M] s_t/‖G‖² and its three components (summing to it).
        norm: [M] ‖g_t h_tᵀ‖_F.
        sequence_share, sequence_norm: [N] ⟨G_i, G⟩/‖G‖² and ‖G_i‖_F.
        entropy_lm_head, entropy_logit: [M] dH_t/dη of the two steps.
    """

    share: Tensor
    policy: Tensor
    kl: Tensor
    bonus: Tensor
    norm: Tensor
    sequence_share: Tensor
    sequence_norm: Tensor
    entropy_lm_head: Tensor
    entropy_logit: Tensor


def token_shares(
    inputs: AttributionInputs,
    coefficient: Tensor,
    kl_coefficient: Tensor,
    bonus_weight: Tensor,
    sequence: Tensor,
    num_sequences: int,
) -> TokenShares:
    """The formulas of the module docstring. ``coefficient`` c_t, ``kl_coefficient`` c^KL_t,
    ``bonus_weight`` w_t, ``sequence`` the sequence id of each token: [M] each."""
    f64 = torch.float64
    sums, tok = inputs.sums, inputs.tokens
    c, c_kl, w = coefficient.to(f64), kl_coefficient.to(f64), bonus_weight.to(f64)
    u, e = sums.u.to(f64), sums.e.to(f64)
    total = inputs.grad_norm_sq.to(f64)
    policy, kl, bonus = (c - c_kl) * u / total, c_kl * u / total, w * e / total
    share = policy + kl + bonus
    logp, entropy = inputs.logp.to(f64), inputs.entropy.to(f64)
    one_minus = -torch.expm1(logp)  # 1 − π_y, exact as π_y → 1
    d_y = logp.exp() * (logp + entropy)
    cross = d_y * one_minus - tok.other_pd.to(f64)  # (e_y − π)·d
    basis_sq = one_minus**2 + tok.other_sq.to(f64)  # ‖e_y − π‖²
    dd = tok.dd.to(f64)
    grad_sq = c**2 * basis_sq + 2 * c * w * cross + w**2 * dd
    norm = grad_sq.clamp(min=0).sqrt() * inputs.hidden_norm.to(f64)
    seq_share = torch.zeros(num_sequences, dtype=f64, device=share.device)
    seq_share.index_add_(0, sequence, share)
    return TokenShares(
        share=share,
        policy=policy,
        kl=kl,
        bonus=bonus,
        norm=norm,
        sequence_share=seq_share,
        sequence_norm=sums.sequence_sq.to(f64).clamp(min=0).sqrt(),
        entropy_lm_head=e,
        entropy_logit=c * cross + w * dd,
    )


def _on_cpu(inputs: AttributionInputs) -> AttributionInputs:
    s, k = inputs.sums, inputs.tokens
    return AttributionInputs(
        LossSums(s.u.cpu(), s.e.cpu(), s.sequence_sq.cpu()),
        TokenSums(k.other_sq.cpu(), k.other_pd.cpu(), k.dd.cpu()),
        inputs.grad_norm_sq.cpu(),
        inputs.entropy.cpu(),
        inputs.logp.cpu(),
        inputs.hidden_norm.cpu(),
    )


def _floats(x: Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in x.tolist()]


def _largest(values: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest |values|, largest first (non-finite values last)."""
    key = values.abs().nan_to_num(nan=-1.0, posinf=math.inf)
    return [int(i) for i in torch.argsort(key, descending=True, stable=True)[:k]]


def _group(share: Tensor, labels: Tensor, names: tuple[str, ...] | list[str]) -> GroupShares:
    """Shares and token counts of the partition ``labels`` [M] (indices into ``names``)."""
    shares = torch.zeros(len(names), dtype=share.dtype, device=share.device)
    shares.index_add_(0, labels, share)
    counts = torch.bincount(labels, minlength=len(names))
    return GroupShares(
        shares={n: num(s) for n, s in zip(names, shares, strict=True)},
        tokens={n: int(k) for n, k in zip(names, counts, strict=True)},
    )


def _sign_labels(advantages: Tensor) -> Tensor:
    """0 for A > 0, 1 for A < 0, 2 for A = 0."""
    return torch.where(advantages > 0, 0, torch.where(advantages < 0, 1, 2))


SIGNS = ("positive", "negative", "zero")


def _regions(objective: Objective, rows: Tensor, cols: Tensor) -> tuple[list[str], Tensor]:
    """Region names (``kept`` first) and each token's index into them: its first region."""
    names = list(objective.terms.regions)
    labels = torch.zeros(rows.numel(), dtype=torch.long, device=rows.device)
    for i in reversed(range(len(names))):
        inside = objective.terms.regions[names[i]].cpu()[rows, cols]
        labels = torch.where(inside, i + 1, labels)
    return [KEPT, *names], labels


def _by_sign(values: Tensor, signs: Tensor, m: int) -> dict[str, float | None]:
    parts = torch.zeros(len(SIGNS), dtype=values.dtype, device=values.device)
    parts.index_add_(0, signs, values)
    return {n: num(p / m) for n, p in zip(SIGNS, parts, strict=True)}


def attribution(
    inputs: AttributionInputs,
    objective: Objective,
    batch: Batch,
    logp_grid: Tensor,
    entropy_coef: float,
    top_k: int,
    texts: TokenTexts | None = None,
) -> Attribution | None:
    """The attribution section of one loss; None when ‖G‖ is zero or not finite (no share is
    defined). ``logp_grid`` [N, T] ℓ as the engine computed it; ``texts`` decodes tokens."""
    total = float(inputs.grad_norm_sq)
    if not math.isfinite(total) or total <= 0.0:
        return None
    mask = batch.mask.cpu()  # [M]-sized work from here on: on the CPU
    rows, cols = valid_index(mask)
    m = rows.numel()
    f64 = torch.float64

    def valid(grid: Tensor) -> Tensor:
        return grid.detach().cpu()[rows, cols]

    c = valid(objective.coefficient)
    penalty = objective.terms.penalty_grad
    c_kl = torch.zeros_like(c) if penalty is None else valid(objective.weights * penalty)
    w = entropy_coef * valid(objective.bonus_weights)  # a_t·S_t·c_H: the selection applies
    t = token_shares(_on_cpu(inputs), c, c_kl, w, rows, batch.num_sequences)

    adv = valid(batch.advantages).to(f64)
    logp = valid(logp_grid).to(f64)
    prob = logp.exp()
    ratio = torch.exp(logp - valid(effective_old_logp(batch, logp_grid)).to(f64))
    region_names, region = _regions(objective, rows, cols)
    signs = _sign_labels(adv)

    within = (torch.cumsum(mask.long(), 1) - 1)[rows, cols]  # index in its completion
    lengths = mask.sum(1)[rows]
    quarter = torch.div(4 * within, lengths, rounding_mode="floor").clamp(max=3)
    bucket = torch.bucketize(prob, torch.tensor([b for _, b in PROB_BUCKETS[:-1]], dtype=f64))
    components = {"policy": (t.policy, c - c_kl)}  # each part's shares and coefficients
    if penalty is not None:
        components["kl"] = (t.kl, c_kl)
    if entropy_coef != 0.0:
        components["entropy_bonus"] = (t.bonus, w)
    groups = {
        "advantage_sign": _group(t.share, signs, SIGNS),
        "component": GroupShares(  # tokens: those whose coefficient of the term is not 0
            shares={k: num(v.sum()) for k, (v, _) in components.items()},
            tokens={k: int((coef != 0).sum()) for k, (_, coef) in components.items()},
        ),
        "region": _group(t.share, region, region_names),
        "prob_bucket": _group(t.share, bucket, [n for n, _ in PROB_BUCKETS]),
        "position": _group(t.share, quarter, QUARTERS),
    }

    counts = torch.bincount(rows, minlength=batch.num_sequences)
    adv_sum = torch.zeros(batch.num_sequences, dtype=f64).index_add_(0, rows, adv)
    present = [i for i in _largest(t.sequence_share, batch.num_sequences) if counts[i] > 0]
    sequences = [
        AttributedSequence(
            sequence=i,
            share=num(t.sequence_share[i]),
            norm=num(t.sequence_norm[i]),
            tokens=int(counts[i]),
            advantage=num(adv_sum[i] / counts[i]),
            text=None if texts is None else texts.sequence(i),
        )
        for i in present[:top_k]
    ]
    ordered = torch.sort(t.sequence_share.nan_to_num(nan=-math.inf), descending=True).values
    reach = torch.nonzero(torch.cumsum(ordered, 0) >= 0.5).squeeze(-1)
    half = int(reach[0]) + 1 if reach.numel() else None

    tokens = []
    for j in _largest(t.share, top_k):
        n, col = int(rows[j]), int(cols[j])
        tokens.append(
            AttributedToken(
                sequence=n,
                position=col,
                token=int(batch.tokens[n, col].item()),
                share=num(t.share[j]),
                norm=num(t.norm[j]),
                advantage=float(adv[j]),
                prob=num(prob[j]),
                ratio=num(ratio[j]),
                region=region_names[int(region[j])],
                text=None if texts is None else texts.token(n, col),
                context=None if texts is None else texts.context(n, col),
            )
        )

    shown = list(range(m)) if m <= POINT_LIMIT else sorted(_largest(t.share, POINT_LIMIT))
    index = torch.tensor(shown, dtype=torch.long)
    return Attribution(
        grad_norm_sq=num(total),
        share_sum=num(t.share.sum()),
        sequences_to_half=half,
        sequences_to_half_share=None if half is None else num(ordered[:half].sum()),
        top_sequences=sequences,
        top_tokens=tokens,
        groups=groups,
        entropy=EntropyChange(
            lm_head=num(t.entropy_lm_head.mean()),
            logit=num(t.entropy_logit.mean()),
            lm_head_by_sign=_by_sign(t.entropy_lm_head, signs, m),
            logit_by_sign=_by_sign(t.entropy_logit, signs, m),
        ),
        points=SharePoints(
            total=m,
            prob=_floats(prob[index]),
            share=_floats(t.share[index]),
            advantage=adv[index].tolist(),
        ),
    )
