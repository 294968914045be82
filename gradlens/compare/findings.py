"""Findings and checks: what stands out in a report, said in words, and the ``--check`` gate.

Findings are plain-language notes on one loss (an overflowing ratio, an amplified coefficient,
clipped tokens, a zero-sum or agreement failure) or on the inputs a loss had to do without.
Checks are the pass/fail invariants ``--check`` turns into an exit status.
"""

from __future__ import annotations

import torch

from gradlens.containers import Batch, LossTerms
from gradlens.losses import LossParams, LossSpec
from gradlens.results import BatchSummary, Check, LossReport, ParityReport

AMPLIFICATION_FINDING = 10.0  # |g_t| / |A_t| above which a policy loss's boost is reported


def findings(
    report: LossReport, batch: Batch, logp: torch.Tensor, g: torch.Tensor, uses_advantage: bool
) -> list[str]:
    """Plain-language notes on what stands out in one loss's report; ``logp`` is [N, T] ℓ and
    ``g`` [N, T] the loss's per-token gradient g_t."""
    notes = []
    if report.non_finite:
        log_r = (logp - batch.old_logp.to(logp.dtype))[batch.mask]
        notes.append(
            f"{report.non_finite} gradient entries are NaN or inf; the largest log-ratio "
            f"log(π_θ/π_old) is {float(log_r.max()):.4g}, so r = e^that overflows "
            f"{str(logp.dtype).removeprefix('torch.')}"
        )
    if uses_advantage:
        adv = batch.advantages[batch.mask].double()
        boost = g[batch.mask].double().abs() / adv.abs()
        boost = boost[(adv != 0) & torch.isfinite(boost)]
        if boost.numel() and float(boost.max()) > AMPLIFICATION_FINDING:
            notes.append(
                f"the per-token coefficient reaches {float(boost.max()):.4g}× |A| "
                f"(REINFORCE: 1×) on {int((boost > AMPLIFICATION_FINDING).sum())} token(s): "
                "π_old(y) ≪ π_θ(y) amplifies the sampled-row gradient"
            )
    clip = report.clipping
    if clip.region:
        notes.append(f"{clip.region:.1%} of tokens are clipped (verl actor/pg_clipfrac)")
    if clip.seq_masked_sequences:
        notes.append(f"OPSM masked {clip.seq_masked_sequences:.1%} of sequences")
    if not report.zero_sum.passed and not report.non_finite:
        notes.append("the logit gradient is not zero-sum within rounding: not a pure softmax loss")
    if report.reference_non_finite and not report.non_finite:
        notes.append(
            f"autograd, as a trainer computes it, gives {report.reference_non_finite} NaN/inf "
            "gradient entries where the closed form is finite: exp's backward multiplies 0·inf "
            "at tokens whose ratio overflowed (verl clamps log r to ±20 to avoid this)"
        )
    elif not report.agreement.passed and not report.non_finite:
        notes.append("the closed form disagrees with autograd beyond the dtype's tolerance")
    return notes


STAND_INS = {
    "ref_logp": "π_old stands in for the reference policy π_ref (set source.ref_drift, or "
    "ref_prob on literal positions)",
    "rollout_logp": "μ_old := π_old, the bypass mode: no training–inference ratio (set "
    "source.rollout_drift, or rollout_prob on literal positions)",
}


def input_notes(spec: LossSpec, batch: Batch, terms: LossTerms, params: LossParams) -> list[str]:
    """What a loss did in place of an input the batch lacks, and settings it could not apply."""
    notes = []
    for need in spec.needs:
        if getattr(batch, need, None) is None and need in STAND_INS:
            notes.append(f"the batch has no {need}: {STAND_INS[need]}")
    if params.corrections and terms.self_aggregated and not spec.handles_corrections:
        notes.append(
            "loss.corrections are not applied to a loss that aggregates itself: it receives "
            "rollout_logp and can weight its terms itself"
        )
    if params.entropy_coef != 0.0:
        notes.append(
            f"the entropy bonus (c_H = {params.entropy_coef:g}) adds a logit gradient "
            "c_H·a_t·π(log π + H) not of the form c·(e_y − π); c_t excludes it"
        )
    return notes


def checks(
    summary: BatchSummary, reports: list[LossReport], parity: list[ParityReport]
) -> list[Check]:
    """The invariants of one run: log-probs ≤ 0, and per loss finite gradients, the zero-sum of
    logit and lm_head gradients and (when it ran) closed form vs autograd; each parity pair.

    Each detail compares a number with its bound with ≤ when the check passed and > when it
    failed."""
    out = [
        Check(
            name="logp_nonpositive",
            loss=None,
            passed=summary.logp_max is None or summary.logp_max <= 0.0,
            detail=f"max log π_old(y) = {summary.logp_max} (log-probs must be ≤ 0)",
        )
    ]
    for r in reports:
        out += [
            Check(
                name="finite",
                loss=r.name,
                passed=r.non_finite == 0,
                detail=f"{r.non_finite} non-finite gradient entries",
            ),
            Check(
                name="zero_sum",
                loss=r.name,
                passed=r.zero_sum.passed,
                detail=(
                    f"logits {r.zero_sum.logits_max_rel} "
                    f"{_bound(r.zero_sum.logits_max_rel, r.zero_sum.logits_tolerance)}; "
                    f"lm_head {r.zero_sum.weight_rel} "
                    f"{_bound(r.zero_sum.weight_rel, r.zero_sum.weight_tolerance)}"
                ),
            ),
        ]
        if r.agreement.ran:
            out.append(
                Check(
                    name="agreement",
                    loss=r.name,
                    passed=r.agreement.passed,
                    detail=(
                        f"closed form vs autograd: c {r.agreement.coefficient}, "
                        f"∂L/∂z {r.agreement.grad_logits}, ∂L/∂W {r.agreement.grad_weight} "
                        f"{'≤' if r.agreement.passed else '>'} {r.agreement.tolerance:.3g}"
                    ),
                )
            )
    for p in parity:
        out.append(
            Check(
                name="parity",
                loss=f"{p.a.name} vs {p.b.name}",
                passed=p.passed,
                detail=(
                    f"max |Δc_t| / max |c_t| = {p.coefficient_rel} "
                    f"{'≤' if p.passed else '>'} {p.tolerance:.3g}; "
                    f"‖∂L/∂W‖ ratio B/A = {p.grad_norm_ratio}"
                ),
            )
        )
    return out


def _bound(value: float | None, tolerance: float) -> str:
    """'≤ tol' or '> tol', truthfully (None, a non-finite value, is not within any bound)."""
    within = value is not None and value <= tolerance
    return f"{'≤' if within else '>'} {tolerance:.3g}"
