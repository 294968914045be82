"""Training–inference corrections: a detached weight w_t on any loss's policy term.

Sources: TIS (Yao et al., fengyao.notion.site/off-policy-rl); MIS, Seq-MIS and the geometric
rejection mask ("When Speed Kills Stability", richardli.xyz/rl-collapse, and verl's
``docs/algo/rollout_corr_math.md``); IcePop (Ling team, ringtech.notion.site/icepop).

With the training–inference ratio ρ_t = π_old(y_t)/μ_old(y_t) = exp(ℓ_old − ℓ_rollout):

    kind        w_t                                     (low, high)   as in
    token_tis   clamp(ρ_t, low, high)                   (—, 2)        Yao et al.; verl token IS
    seq_tis     clamp(ρ_i, low, high), ρ_i = Π_t ρ_t    (—, 2)        verl rollout_is=sequence
    token_mis   ρ_t·1[low ≤ ρ_t ≤ high]                 (—, 3)        TRL token_mask
    seq_mis     ρ_i·1[low ≤ ρ_i ≤ high]                 (—, 3)        TRL sequence_mask (default)
    icepop      ρ_t·1[low ≤ ρ_t ≤ high]                 (0.5, 5)      OpenRLHF/slime icepop
    geo_mask    1[low ≤ exp(mean_t log ρ_t) ≤ high]     (0.999, 1.001)  verl seq_mean_k1

A bound left unset (—) is no bound. The per-token loss becomes w_t·(policy term) and the
per-token gradient w_t·g_t: the logit gradient keeps the direction e_y − π and stays zero-sum. A
loss's penalty (``grpo``'s KL, `LossTerms.penalty`) is not weighted, as in every framework. On
a sequence-level loss (GSPO) a token weight acts through its sequence mean, which gives the same
loss and gradient because the per-token value and the aggregation weight are constant within
the sequence. Several corrections multiply.

``icepop`` and ``token_mis`` are the same weight; they differ in their default thresholds only.
Trap A8: verl's k1 rejection options threshold −log ρ, so verl's ``"lo_hi"`` equals gradlens's
[lo, hi] only when lo = 1/hi. OpenRLHF's ``seq-mask-tis`` is ``geo_mask`` times an *unclamped*
token ρ (A13): compose ``geo_mask`` with ``token_mis`` with no bounds to reproduce it.

Each correction reports the tokens it truncated or masked as a region (``tis_truncated``,
``seq_tis_truncated``, ``mis_masked``, ``seq_mis_masked``, ``icepop_masked``,
``seq_geo_masked``); names starting with ``seq_`` are also reported per sequence.

Renormalising rejection. A masking kind (token_mis, seq_mis, icepop, geo_mask) zeroes w_t on
the tokens it rejects but leaves them in the aggregation's normaliser: under ``token_mean`` a
kept token still weighs 1/N_tok. verl's rejection sampling (``rollout_rs``) instead removes the
rejected tokens from the response mask, so the normaliser shrinks with them: 1/N_kept under
token-mean (a factor N_tok/N_kept on every kept token), 1/B'_kept for the sequence means.
``renormalize: true`` on a correction does the same here: `kept_mask` is the mask every
aggregation weight (and the entropy bonus) is computed from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import Correction
from gradlens.losses.off_policy_mask import sequence_mean


def _outside(x: Tensor, low: float | None, high: float | None) -> Tensor:
    out = torch.zeros_like(x, dtype=torch.bool)
    if low is not None:
        out |= x < low
    if high is not None:
        out |= x > high
    return out


def _clamp(x: Tensor, low: float | None, high: float | None) -> Tensor:
    return torch.clamp(x, min=low, max=high)


def _seq(values: Tensor, like: Tensor) -> Tensor:
    return values[:, None].expand_as(like)  # [N] → [N, T]


def _token_tis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho = torch.exp(log_rho)
    return _clamp(rho, c.low, c.high), _outside(rho, c.low, c.high)


def _seq_tis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho_seq = _seq(torch.exp(log_rho.sum(-1)), log_rho)  # Π_t ρ_t (masked log ρ are 0)
    return _clamp(rho_seq, c.low, c.high), _outside(rho_seq, c.low, c.high)


def _token_mask(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho = torch.exp(log_rho)
    out = _outside(rho, c.low, c.high)
    return torch.where(out, 0.0, rho), out


def _seq_mis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho_seq = _seq(torch.exp(log_rho.sum(-1)), log_rho)
    out = _outside(rho_seq, c.low, c.high)
    return torch.where(out, 0.0, rho_seq), out


def _geo_mask(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    geo = _seq(torch.exp(sequence_mean(log_rho, mask)), log_rho)
    out = _outside(geo, c.low, c.high)
    return (~out).to(log_rho.dtype), out


WeightFn = Callable[[Tensor, Tensor, Correction], tuple[Tensor, Tensor]]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One correction kind: its weight, default thresholds, region name and description."""

    fn: WeightFn
    low: float | None
    high: float | None
    region: str
    formula: str
    masks: bool  # its region is a rejection (w = 0), not a truncation: it can renormalize


KINDS: dict[str, Kind] = {
    "token_tis": Kind(_token_tis, None, 2.0, "tis_truncated", "clamp(ρ_t, low, high)", False),
    "seq_tis": Kind(_seq_tis, None, 2.0, "seq_tis_truncated", "clamp(Π_t ρ_t, low, high)", False),
    "token_mis": Kind(_token_mask, None, 3.0, "mis_masked", "ρ_t·1[low ≤ ρ_t ≤ high]", True),
    "seq_mis": Kind(_seq_mis, None, 3.0, "seq_mis_masked", "Π_t ρ_t·1[low ≤ Π_t ρ_t ≤ high]", True),
    "icepop": Kind(_token_mask, 0.5, 5.0, "icepop_masked", "ρ_t·1[low ≤ ρ_t ≤ high]", True),
    "geo_mask": Kind(
        _geo_mask, 0.999, 1.001, "seq_geo_masked", "1[low ≤ exp(mean_t log ρ_t) ≤ high]", True
    ),
}
MASKING_KINDS = tuple(name for name, kind in KINDS.items() if kind.masks)


def with_defaults(
    kind: str, low: float | None, high: float | None, renormalize: bool = False
) -> Correction:
    """A `Correction` whose unset thresholds take the kind's defaults."""
    k = KINDS[kind]
    return Correction(
        kind, k.low if low is None else low, k.high if high is None else high, renormalize
    )


def correction_weight(inputs: TokenInputs, c: Correction) -> tuple[Tensor, dict[str, Tensor]]:
    """[N, T] detached weight w_t of one correction and its region; needs ``rollout_logp``."""
    assert inputs.rollout_logp is not None
    m = inputs.mask
    log_rho = torch.where(m, inputs.old_logp - inputs.rollout_logp, 0.0)  # [N, T]
    kind = KINDS[c.kind]
    weight, out = kind.fn(log_rho, m, c)
    return torch.where(m, weight, 0.0), {kind.region: out & m}


def missing_rollout(corrections: tuple[Correction, ...]) -> str:
    """Why corrections cannot run on a batch without rollout log-probs, and what to set."""
    kinds = ", ".join(c.kind for c in corrections)
    return (
        f"loss.corrections ({kinds}) need the rollout log-probs μ_old of the inference engine, "
        "and this batch has none: set source.rollout_drift (synthetic source), rollout_prob / "
        "rollout_logp on the positions (literal source), or store 'rollout_log_probs' in the "
        "batch file"
    )


def kept_mask(
    mask: Tensor, old_logp: Tensor, rollout_logp: Tensor | None, corrections: tuple[Correction, ...]
) -> Tensor:
    """[N, T] ``mask`` without the tokens a renormalising correction rejects (the mask every
    aggregation weight is computed from); ``mask`` itself when no correction renormalises."""
    renormalizing = tuple(c for c in corrections if c.renormalize)
    if not renormalizing or rollout_logp is None:  # without μ_old apply_corrections stops the run
        return mask
    log_rho = torch.where(mask, old_logp - rollout_logp, 0.0)  # [N, T]
    kept = mask.clone()
    for c in renormalizing:
        _, out = KINDS[c.kind].fn(log_rho, mask, c)
        kept &= ~out
    return kept


def apply_corrections(
    terms: LossTerms, inputs: TokenInputs, corrections: tuple[Correction, ...]
) -> LossTerms:
    """``terms`` with the policy part weighted by every correction (unchanged without any).

    A loss that aggregates itself (a user or verl-shaped function) is left as it is: its
    per-token structure is its own; it receives ``rollout_logp`` and can weight it itself.
    """
    if not corrections or terms.self_aggregated:
        return terms
    if inputs.rollout_logp is None:
        raise GradlensError(missing_rollout(corrections))
    m = inputs.mask
    weight = torch.ones_like(inputs.old_logp)
    regions = dict(terms.regions)
    for c in corrections:
        w, region = correction_weight(inputs, c)
        weight = weight * w
        regions.update(region)
    if terms.sequence_level:
        weight = sequence_mean(weight, m)[:, None].expand_as(weight)
    weight = torch.where(m, weight, 0.0)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    penalty = terms.penalty if terms.penalty is not None else zero
    penalty_c = terms.penalty_grad if terms.penalty_grad is not None else zero
    return dataclasses.replace(
        terms,
        per_token=weight * (terms.per_token - penalty) + penalty,
        per_token_grad=weight * (terms.per_token_grad - penalty_c) + penalty_c,
        regions=regions,
    )
