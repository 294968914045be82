"""Findings and checks: what stands out in a report, said in words, and the ``--check`` gate.

Findings are plain-language notes on one loss (where a non-finite gradient comes from, an
amplified coefficient, clipped tokens, a zero-sum or agreement failure, a gradient that is
identically zero) or on the inputs a loss had to do without. Checks are the pass/fail invariants
``--check`` turns into an exit status; a batch that cannot support a diagnosis (no token in the
loss, or a loss whose gradient its inputs make identically zero) fails them, so that ``passed``
is never true for it.
"""

from __future__ import annotations

import math

import torch

from gradlens.containers import Batch, LossTerms
from gradlens.diagnostics.non_finite import trace
from gradlens.grads import Objective, token_inputs
from gradlens.losses import LossParams, LossSpec
from gradlens.losses.corrections import correction_weight
from gradlens.results import BatchSummary, Check, LossReport, ParityReport, Signal, SplitReport

AMPLIFICATION_FINDING = 10.0  # |g_t| / |A_t| above which a policy loss's boost is reported
CONCENTRATION_FINDING = 0.25  # half the update from at most this share of the sequences
CANCEL_FINDING = 0.1  # a term that cancels at least this much of the policy term's share
TERM_WORDS = {"kl": "the KL term", "entropy_bonus": "the entropy bonus"}


def signal(
    batch: Batch,
    logp: torch.Tensor,
    obj: Objective,
    spec: LossSpec,
    params: LossParams,
    head_norm: float | None = None,
) -> Signal:
    """Whether the gradient is identically zero (c_t = 0 at every token in the loss and no
    entropy bonus), and why: the first cause in the inputs (no token, every advantage zero under
    a loss that scales with A, every token masked by the corrections), else the loss's own
    rules. With c_t ≠ 0 somewhere, the lm_head gradient ∂L/∂W = Σ_t G_t h_tᵀ can still be
    exactly zero because of the inputs, which ``head_norm`` (its measured ‖∂L/∂W‖_F) shows:
    every hidden state in the loss zero, or π_θ one-hot at y_t (e_y − π_t = 0: a kept set of
    the sampled token alone, or logits that put all the mass on it)."""
    m = batch.mask
    count = int(m.sum())
    if count == 0:
        return Signal(zero=True, cause="no token enters the loss", from_inputs=True)
    tokens = f"the {count} token(s) in the loss"
    if bool((obj.coefficient[m] != 0).any()) or params.entropy_coef != 0.0:
        # the entropy bonus's gradient a_t·c_H·π(log π + H) is not of the c-form: with it the
        # gradient is not zero whatever c_t is (losses.md TC11: the bonus on its own, A = 0)
        active, where = _gradient_tokens(batch, obj.coefficient, params.entropy_coef, tokens)
        if head_norm == 0.0:
            return Signal(
                zero=True, cause=_zero_head_cause(batch, logp, active, where), from_inputs=True
            )
        noise = _rounding_cause(logp, active, where)
        if noise is None and params.entropy_coef == 0.0:
            noise = _subnormal_cause(batch, obj.coefficient, active, where)
        if noise is not None:
            return Signal(zero=False, cause=noise, from_inputs=True)
        return Signal(zero=False, cause=None, from_inputs=False)
    if spec.uses_advantage and bool((batch.advantages[m] == 0).all()):
        return Signal(
            zero=True,
            cause=f"every advantage is zero at {tokens}, and {spec.name}'s c_t scales with A",
            from_inputs=True,
        )
    if params.corrections and batch.rollout_logp is not None and not obj.terms.self_aggregated:
        inputs = token_inputs(batch, logp.detach())
        weight = torch.ones_like(inputs.old_logp)
        for c in params.corrections:
            weight = weight * correction_weight(inputs, c)[0]
        if bool((weight[m] == 0).all()):
            kinds = ", ".join(c.kind for c in params.corrections)
            return Signal(
                zero=True,
                cause=f"loss.corrections ({kinds}) give weight 0 to every one of {tokens}",
                from_inputs=True,
            )
    covering = [name for name, region in obj.terms.regions.items() if bool(region[m].all())]
    rules = f" ({', '.join(covering)})" if covering else ""
    return Signal(
        zero=True,
        cause=f"{spec.name}'s own rules{rules} give c_t = 0 at every one of {tokens}",
        from_inputs=False,
    )


def _gradient_tokens(
    batch: Batch, coefficient: torch.Tensor, entropy_coef: float, tokens: str
) -> tuple[torch.Tensor, str]:
    """The tokens whose gradient is not switched off (c_t ≠ 0, or every token with the entropy
    bonus) [N, T], and their description for a cause."""
    m = batch.mask
    active = m if entropy_coef != 0.0 else m & (coefficient != 0)
    if bool(torch.equal(active, m)):
        return active, tokens
    return active, f"the {int(active.sum())} of {tokens} where c_t ≠ 0"


def _rounding_cause(logp: torch.Tensor, active: torch.Tensor, where: str) -> str | None:
    """Why a non-zero ∂L/∂W is only rounding, or None: π_θ(y_t) rounds to 1 in the softmax's
    dtype at every ``active`` token (1 − π_θ(y) = −log π_θ(y) below the unit roundoff u), so
    e_y − π_t is 0 at y and, elsewhere, a mass of at most u that the rounding of π itself
    decides (in float64, the same batch has its real gradient)."""
    ell = logp.detach()[active]
    u = torch.finfo(logp.dtype).eps / 2
    if ell.numel() == 0 or not bool((-ell < u).all()):
        return None
    gap = max(float((-ell).max()), 0.0)  # the largest 1 − π_θ(y)
    return (
        f"π_θ(y_t) rounds to 1 in {str(logp.dtype).removeprefix('torch.')} at every one of "
        f"{where} (largest 1 − π_θ(y) {gap:.3g}, below u = {u:.3g}), so e_y − π_t is rounding "
        "and so is ∂L/∂W; rerun with --set dtype=float64"
    )


def _subnormal_cause(
    batch: Batch, coefficient: torch.Tensor, active: torch.Tensor, where: str
) -> str | None:
    """Why ∂L/∂W is only rounding, or None: every product |c_t·(e_y − π_t)_v·h_t,j| ≤
    |c_t|·‖h_t‖_∞ lies below the smallest normal number of the hidden states' dtype at the
    ``active`` tokens, where a number keeps fewer significant bits the smaller it is (a
    subnormal float32 of 1e-43 has 7 of 24), so ∂L/∂W is its rounding: how much of it survives
    depends on the order of the products (the streamed engine forms c_t·h_t first and gets 0
    where autograd's G_t h_tᵀ keeps a few bits)."""
    hidden = batch.hidden
    if hidden.dim() != 3 or not bool(active.any()):
        return None
    size = coefficient[active].double().abs() * hidden[active].double().abs().amax(-1)
    tiny = torch.finfo(hidden.dtype).smallest_normal
    largest = float(size.max())
    if not largest < tiny:
        return None
    return (
        f"every product c_t·h_t at {where} is below {hidden.dtype}'s smallest normal number "
        f"{tiny:.3g} (largest |c_t|·‖h_t‖_∞ {largest:.3g}), so ∂L/∂W = Σ_t G_t h_tᵀ is "
        "subnormal, with few significant bits or none; rescale the hidden states or rerun with "
        "--set dtype=float64"
    )


def _zero_head_cause(batch: Batch, logp: torch.Tensor, active: torch.Tensor, where: str) -> str:
    """Why ∂L/∂W is exactly zero although some c_t is not (`signal`), in words, at the
    ``active`` tokens (`_gradient_tokens`)."""
    hidden = batch.hidden
    if hidden.dim() == 3 and not bool(hidden[active].ne(0).any()):
        return (
            f"every hidden state h_t at {where} is zero, so ∂L/∂W = Σ_t G_t h_tᵀ is zero "
            "whatever the loss"
        )
    if not bool(logp.detach()[active].ne(0).any()):
        return (
            f"π_θ(y_t) = 1 at every one of {where} (all the mass on the sampled token, or a "
            "kept set of it alone), so e_y − π_t and ∂L/∂W are zero"
        )
    largest = float(hidden[active].abs().max()) if hidden.dim() == 3 else math.inf
    tiny = torch.finfo(hidden.dtype).smallest_normal
    if largest < tiny:
        return (
            f"every hidden state h_t at {where} is below {hidden.dtype}'s smallest normal number "
            f"{tiny:.3g} (largest |h| {largest:.3g}), so the products G_t h_tᵀ underflow to zero"
        )
    return f"∂L/∂W = Σ_t G_t h_tᵀ is exactly zero at {where}"


def findings(
    report: LossReport, batch: Batch, logp: torch.Tensor, obj: Objective, spec: LossSpec
) -> list[str]:
    """Plain-language notes on what stands out in one loss's report; ``logp`` is [N, T] ℓ and
    ``obj`` the loss's objective on it."""
    notes = []
    g = obj.terms.per_token_grad
    if report.non_finite:
        notes.append(
            f"{report.non_finite} gradient entries are NaN or inf: "
            + trace(batch, logp, obj, spec.name)
        )
    if report.signal.zero:
        notes.append(
            f"the gradient is identically zero: {report.signal.cause}"
            + ("; this batch cannot support a diagnosis of it" if report.signal.from_inputs else "")
        )
    if spec.uses_advantage:
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


def attribution_notes(report: LossReport, num_sequences: int, asked: bool) -> list[str]:
    """What the attribution says in words: a concentrated update, a term that cancels the
    policy term; why there is none when it was asked for."""
    att = report.attribution
    if att is None:
        if not asked:
            return []
        why = "is not finite" if report.rows.total_norm is None else "is zero"
        return [f"no attribution: ‖∂L/∂W‖ {why}, so no share is defined"]
    notes = []
    half, share = att.sequences_to_half, att.sequences_to_half_share
    if (
        half is not None
        and share is not None
        and num_sequences >= 4
        and half <= CONCENTRATION_FINDING * num_sequences
    ):
        notes.append(
            f"{share:.0%} of the lm_head update comes from {half} of {num_sequences} sequences"
        )
    parts = att.groups["component"].shares
    policy = parts.get("policy")
    for name, words in TERM_WORDS.items():
        other = parts.get(name)
        if policy is None or other is None or policy <= 0 or other >= 0:
            continue
        if -other >= CANCEL_FINDING * policy:
            notes.append(f"{words} cancels {-other / policy:.0%} of the policy term's share")
    return notes


STAND_INS = {
    "ref_logp": "π_old stands in for the reference policy π_ref (set source.ref_drift, or "
    "ref_prob on literal positions)",
    "teacher_logp": "log q(y) := ℓ_old, so A = ℓ_old − ℓ (set source.teacher: perturbed or "
    "source.teacher_path, or give teacher_logp or a teacher's distribution in a batch file or "
    "on literal positions)",
    "rollout_logp": "μ_old := π_old, the bypass mode: no training–inference ratio (set "
    "source.rollout_drift, or rollout_prob on literal positions)",
}


def input_notes(spec: LossSpec, batch: Batch, terms: LossTerms, params: LossParams) -> list[str]:
    """What a loss did in place of an input the batch lacks, and settings it could not apply."""
    notes = []
    for need in spec.needs:
        if getattr(batch, need, None) is None and need in STAND_INS:
            notes.append(f"the batch has no {need}: {STAND_INS[need]}")
    if params.corrections and spec.correction_note:
        notes.append(f"loss.corrections on {spec.name}: {spec.correction_note}")
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
    if params.distill is not None:
        d = params.distill
        notes.append(
            f"the distillation term ({d.divergence}, {d.form}, λ = {d.coef:g}) adds a dense "
            "zero-sum logit gradient λ·a_t·(u − π·Σu) not of the form c·(e_y − π); c_t "
            "excludes it"
        )
    return notes


def measured(value: float | None, non_finite: int) -> str:
    """A number of a check's detail, or why it was not measured (never Python's None)."""
    if value is not None:
        return f"{value:.3g}"
    if non_finite:
        return f"not measured ({non_finite} non-finite gradient entries)"
    return "not measured (not finite)"


def checks(
    summary: BatchSummary,
    reports: list[LossReport],
    parity: list[ParityReport],
    mask_name: str = "the mask",
    split: SplitReport | None = None,
) -> list[Check]:
    """The invariants of one run: a token in the loss, log-probs ≤ 0, and per loss a gradient
    the inputs do not make identically zero, finite gradients, the zero-sum of logit and
    lm_head gradients and (when it ran) closed form vs autograd; each parity pair.
    ``mask_name`` is how the batch's source names its mask.

    Each detail compares a measured number with its bound with ≤ when it is within and > when
    it is not; a number that could not be measured is written "not measured" with the reason."""
    out = [
        Check(
            name="tokens",
            loss=None,
            passed=summary.num_tokens > 0,
            detail=f"{summary.num_tokens} token(s) in the loss"
            if summary.num_tokens
            else f"no valid token: {mask_name} is all zero, so nothing enters the loss and no "
            "gradient can be diagnosed",
        ),
        Check(
            name="logp_nonpositive",
            loss=None,
            passed=summary.logp_max is None or summary.logp_max <= 0.0,
            detail=f"max log π_old(y) = {summary.logp_max:.6g} (log-probs must be ≤ 0)"
            if summary.logp_max is not None
            else "max log π_old(y) not measured: "
            + ("it is not finite" if summary.num_tokens else "no token in the loss"),
        ),
    ]
    for r in reports:
        s = r.signal
        zs, ag = r.zero_sum, r.agreement
        bad = r.non_finite
        out += [
            Check(
                name="diagnosable",
                loss=r.name,
                passed=not s.from_inputs,
                detail=f"the gradient is identically zero: {s.cause}; the batch cannot support "
                "a diagnosis of this loss"
                if s.from_inputs and s.zero
                else f"the gradient is rounding noise: {s.cause}; the batch cannot support a "
                "diagnosis of this loss"
                if s.from_inputs
                else f"the gradient is identically zero: {s.cause}; that is a finding about "
                "the loss, not a fault of the batch"
                if s.zero
                else "c_t ≠ 0 at some token in the loss",
            ),
            Check(
                name="finite",
                loss=r.name,
                passed=bad == 0,
                detail=f"{bad} non-finite gradient entries",
            ),
            Check(
                name="zero_sum",
                loss=r.name,
                passed=zs.passed,
                detail=(
                    f"logits {compared(zs.logits_max_rel, zs.logits_tolerance, bad)}; "
                    f"lm_head {compared(zs.weight_rel, zs.weight_tolerance, bad)}"
                    if zs.logits_max_rel is not None and zs.weight_rel is not None
                    else f"not measured: the gradient has {bad} non-finite entries"
                ),
            ),
        ]
        if ag.ran:
            parts = (("c", ag.coefficient), ("∂L/∂z", ag.grad_logits), ("∂L/∂W", ag.grad_weight))
            shown = [f"{label} {value:.3g}" for label, value in parts if value is not None]
            missing = [label for label, value in parts if value is None]
            judged = parts if ag.weight_judged else parts[:2]
            detail = "closed form vs autograd: " + ", ".join(shown)
            if shown:
                within = all(value <= ag.tolerance for _, value in judged if value is not None)
                detail += f" {'≤' if within else '>'} {ag.tolerance:.3g}"
            if not ag.weight_judged:
                detail += (
                    "; ∂L/∂W not judged: the inputs make it zero or rounding (the diagnosable "
                    "check says why)"
                )
            if missing:
                why = bad + r.reference_non_finite
                detail += ("; " if shown else "") + (
                    f"{', '.join(missing)} not measured ({why} non-finite gradient entries, "
                    "closed form and autograd together)"
                )
            out.append(Check(name="agreement", loss=r.name, passed=ag.passed, detail=detail))
    for p in parity:
        out.append(
            Check(
                name="parity",
                loss=f"{p.a.name} vs {p.b.name}",
                passed=p.passed,
                detail=(
                    f"max |Δc_t| / max |c_t| = {compared(p.coefficient_rel, p.tolerance, 0)}; "
                    f"‖∂L/∂W‖ ratio B/A = {measured(p.grad_norm_ratio, 0)}"
                ),
            )
        )
    if split is not None:
        out += split_checks(split)
    return out


def split_checks(split: SplitReport) -> list[Check]:
    """One ``split`` check per loss: ‖G_split − G_full‖ / ‖G_full‖ within the rounding of
    accumulating dp·ga micro-batches (the weights' max relative difference when the gradient
    could not be measured), with the factor in words."""
    where = f"{split.convention}:{split.setting} at micro={split.micro},dp={split.dp},ga={split.ga}"
    out = []
    for loss in split.losses:
        if loss.grad_rel_diff is not None:
            measure = (
                f"‖G_split − G_full‖/‖G_full‖ = {compared(loss.grad_rel_diff, split.tolerance, 0)}"
            )
            if loss.grad_norm_ratio is not None:
                measure += f", ‖∂L/∂W‖ ratio {loss.grad_norm_ratio:.4g}"
        else:
            measure = (
                "the gradient was not measured (zero or not finite); max_t |w_split − w_full| / "
                f"max_t |w_full| = {compared(split.weight_rel_diff, split.tolerance, 0)}"
            )
        out.append(
            Check(
                name="split",
                loss=loss.name,
                passed=loss.passed,
                detail=f"{where}: {measure}; {split.factor}",
            )
        )
    return out


def compared(value: float | None, tolerance: float, non_finite: int) -> str:
    """'x ≤ tol' or 'x > tol', truthfully, or why x was not measured (no bound is claimed for a
    number that does not exist)."""
    if value is None:
        return measured(value, non_finite)
    return f"{value:.3g} {'≤' if value <= tolerance else '>'} {tolerance:.3g}"
