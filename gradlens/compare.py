"""`gradlens compare` as a pure function: a validated `Config` in, a `CompareReport` out.

config → source builds a `Batch` → one shared `SoftmaxView` → for each loss: closed-form
gradients, the autograd reference, and the six diagnostics → checks → report. No I/O here.
"""

from __future__ import annotations

import platform
import sys

import torch

import gradlens
from gradlens.config import Config, LossConfig
from gradlens.containers import Batch, LossTerms
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.agreement import agreement, not_run
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.metrics import loss_metrics, rollout_stats
from gradlens.diagnostics.numbers import count_non_finite, num
from gradlens.diagnostics.ratios import ratio_stats
from gradlens.diagnostics.row_norms import row_norms
from gradlens.diagnostics.sampled_row import sampled_row
from gradlens.diagnostics.tokens import token_details
from gradlens.diagnostics.zero_sum import zero_sum
from gradlens.errors import GradlensError
from gradlens.grads import (
    Aggregation,
    LossGradients,
    SoftmaxView,
    autograd_reference,
    closed_form,
    effective_old_logp,
    softmax_view,
)
from gradlens.logits import softmax_dtype
from gradlens.losses import LossParams, LossSpec, get_loss
from gradlens.losses.corrections import with_defaults
from gradlens.metric_names import metric_names
from gradlens.parity import build_parity, parity
from gradlens.results import (
    BatchSummary,
    Check,
    CompareReport,
    EngineInfo,
    Environment,
    LossReport,
    ParityReport,
)
from gradlens.sources import build_batch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
TOKEN_DETAIL_LIMIT = 4096  # tokens × vocabulary entries printed under token_details: auto
AMPLIFICATION_FINDING = 10.0  # |g_t| / |A_t| above which a policy loss's boost is reported


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error without a GPU) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GradlensError(
            "device: 'cuda' was requested but no CUDA device is available to torch "
            f"{torch.__version__}; use --device cpu, or --device auto to fall back"
        )
    return torch.device(name)


def loss_params(config: Config) -> LossParams:
    return loss_params_from(config.loss)


def loss_params_from(c: LossConfig) -> LossParams:
    """The ``loss`` section as the plain `LossParams` every loss reads (any command)."""
    return LossParams(
        c.eps_low,
        c.eps_high,
        c.dual_clip,
        c.opsm_delta,
        tau_pos=c.tau_pos,
        tau_neg=c.tau_neg,
        cispo_eps_low=c.cispo_eps_low,
        cispo_eps_high=c.cispo_eps_high,
        cispo_cap=c.cispo_cap,
        kl_estimator=c.kl_estimator,
        kl_coef=c.kl_coef,
        minirl_cap=c.minirl_cap,
        minirl_truncation=c.minirl_truncation,
        entropy_coef=c.entropy_coef,
        corrections=tuple(with_defaults(x.kind, x.low, x.high) for x in c.corrections),
        aggregation=c.aggregation,
        loss_scale_factor=c.loss_scale_factor,
    )


def summarize_batch(
    batch: Batch, entropy: torch.Tensor, sampled_probs: torch.Tensor
) -> BatchSummary:
    """The batch in a few numbers; ``entropy`` and ``sampled_probs`` are [M] over valid tokens."""
    m = batch.mask
    empty = entropy.numel() == 0
    return BatchSummary(
        source=batch.source,
        num_sequences=batch.num_sequences,
        num_tokens=batch.num_tokens,
        vocab_size=batch.vocab_size,
        hidden_size=batch.hidden_size,
        advantages=batch.advantage_note,
        mean_entropy=None if empty else num(entropy.mean()),
        mean_sampled_prob=None if empty else num(sampled_probs.mean()),
        mean_abs_advantage=None if empty else num(batch.advantages[m].abs().mean()),
        logp_max=None if empty else num(batch.old_logp[m].max()),
    )


def run_compare(config: Config) -> CompareReport:
    """Run every loss of ``config`` on one batch and diagnose it."""
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    batch = build_batch(config, device, dtype)
    params = loss_params(config)
    agg = Aggregation(config.loss.aggregation, config.loss.loss_scale_factor)
    path, reason = choose_engine(config, batch, params)
    model_report = None
    pair = None if config.parity is None else (config.parity.losses[0], config.parity.losses[1])
    parity_inputs = None
    view: SoftmaxView | None = None
    if path == "streamed":
        from gradlens.compare_streamed import run_streamed

        streamed = run_streamed(batch, config, params, agg, reason, pair)
        logp, engine_info, parity_inputs = streamed.logp, streamed.info, streamed.parity
        entropy, sampled_probs = streamed.result.tokens.entropy, streamed.result.tokens.sampled_prob
        reports = [
            r.model_copy(update={"findings": loss_findings(r, t, batch, logp, params)})
            for r, t in zip(streamed.reports, streamed.terms, strict=True)
        ]
    else:
        view = softmax_view(batch)
        details = config.diagnostics.token_details
        show_tokens = details == "on" or (
            details == "auto" and batch.num_tokens * batch.vocab_size <= TOKEN_DETAIL_LIMIT
        )
        reports = [
            diagnose_loss(name, batch, view, params, agg, config, dtype, show_tokens)
            for name in config.losses
        ]
        if batch.model_context is not None:  # a real model: each loss through the network
            from gradlens.diagnostics.model_grads import model_gradients

            model_report, reports = model_gradients(batch, view, reports, params, agg)
        logp, entropy, sampled_probs = view.logp, view.entropy, view.sampled_probs
        engine_info = EngineInfo(path="materialized", reason=reason)
    summary = summarize_batch(batch, entropy, sampled_probs)
    parity_report = None
    if config.parity is not None:
        tol = config.parity.tolerance or tolerances.agreement(dtype)
        if parity_inputs is not None:  # the streamed run's: no [M, V] or [V, H] tensor
            parity_report = build_parity(batch, logp, *parity_inputs, agg, tol)
        else:
            assert view is not None
            a, b = config.parity.losses
            parity_report = parity(batch, view, get_loss(a), get_loss(b), params, agg, tol)
    checks = [
        Check(
            name="logp_nonpositive",
            loss=None,
            passed=summary.logp_max is None or summary.logp_max <= 0.0,
            detail=f"max log π_old(y) = {summary.logp_max} (log-probs must be ≤ 0)",
        )
    ]
    for r in reports:
        checks += [
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
                    f"logits {r.zero_sum.logits_max_rel} ≤ {r.zero_sum.logits_tolerance:.3g}; "
                    f"lm_head {r.zero_sum.weight_rel} ≤ {r.zero_sum.weight_tolerance:.3g}"
                ),
            ),
        ]
        if r.agreement.ran:
            checks.append(
                Check(
                    name="agreement",
                    loss=r.name,
                    passed=r.agreement.passed,
                    detail=(
                        f"closed form vs autograd: c {r.agreement.coefficient}, "
                        f"∂L/∂z {r.agreement.grad_logits}, ∂L/∂W {r.agreement.grad_weight} "
                        f"≤ {r.agreement.tolerance:.3g}"
                    ),
                )
            )
    if parity_report is not None:
        checks.append(parity_check(parity_report))
    return CompareReport(
        environment=Environment(
            gradlens=gradlens.__version__,
            python=sys.version.split()[0],
            torch=torch.__version__,
            platform=platform.platform(),
            device=str(device),
            dtype=config.dtype,
            softmax_dtype=str(softmax_dtype(dtype)).removeprefix("torch."),
            seed=config.seed,
        ),
        config=config.model_dump(mode="json"),
        batch=summary,
        ratio=ratio_stats(logp, effective_old_logp(batch, logp), batch.mask),
        losses=reports,
        checks=checks,
        passed=all(c.passed for c in checks),
        model=model_report,
        rollout=None
        if batch.rollout_logp is None
        else rollout_stats(effective_old_logp(batch, logp), batch.rollout_logp, batch.mask),
        parity=parity_report,
        engine=engine_info,
        metric_names=metric_names(),
    )


STREAM_ABOVE = 1 << 24  # auto: stream when tokens × vocabulary exceeds this (64 MiB of float32)


def choose_engine(config: Config, batch: Batch, params: LossParams) -> tuple[str, str]:
    """("materialized" | "streamed", why)."""
    wanted = config.diagnostics.engine
    needs = []
    if batch.model_context is not None:
        needs.append(f"the whole-model gradients ({batch.model_context.keys}) use the full softmax")
    if needs:
        if wanted == "streamed":
            raise GradlensError(
                "diagnostics.engine: 'streamed' cannot run here: "
                + "; ".join(needs)
                + "; use 'materialized' or 'auto'"
            )
        return "materialized", "; ".join(needs)
    if wanted != "auto":
        return wanted, f"diagnostics.engine = {wanted}"
    entries = batch.num_tokens * batch.vocab_size
    if entries > STREAM_ABOVE:
        return "streamed", f"tokens × vocabulary = {entries} > {STREAM_ABOVE}"
    return "materialized", f"tokens × vocabulary = {entries} ≤ {STREAM_ABOVE}"


def loss_findings(
    report: LossReport, terms: LossTerms, batch: Batch, logp: torch.Tensor, params: LossParams
) -> list[str]:
    """The findings of a loss report computed by the streamed engine."""
    spec = get_loss(report.name)
    notes = findings(report, batch, logp, terms.coefficient, spec.uses_advantage)
    return notes + input_notes(spec, batch, terms, params, params.entropy_coef != 0.0)


def diagnose_loss(
    name: str,
    batch: Batch,
    view: SoftmaxView,
    params: LossParams,
    agg: Aggregation,
    config: Config,
    dtype: torch.dtype,
    show_tokens: bool,
) -> LossReport:
    """Gradients of one loss, its autograd twin, and the diagnostics of both."""
    spec = get_loss(name)
    grads = closed_form(batch, view, spec, params, agg)
    reference = (
        None
        if config.diagnostics.reference == "none"
        else autograd_reference(batch, spec, params, agg)
    )
    c_valid = grads.coefficient[batch.mask]
    non_finite = count_non_finite(grads.grad_logits, grads.grad_weight)
    report = LossReport(
        name=name,
        formula=spec.formula,
        coefficient_formula=spec.coefficient,
        loss=num(grads.loss),
        coefficient_abs_mean=num(c_valid.abs().mean()) if c_valid.numel() else None,
        coefficient_abs_max=num(c_valid.abs().max()) if c_valid.numel() else None,
        non_finite=non_finite,
        reference_non_finite=0
        if reference is None
        else count_non_finite(reference.grad_logits, reference.grad_weight),
        sampled_row=sampled_row(
            view, grads, None if reference is None else reference.grad_logits, spec.post_formula
        ),
        rows=row_norms(grads.grad_weight, view.tokens, config.diagnostics.top_k),
        zero_sum=zero_sum(
            grads.grad_logits,
            grads.grad_weight,
            zero_sum_scale(grads, view, params, c_valid),
            view.hidden,
            view.logits,
            entropy_bonus=grads.entropy_grad_logits is not None,
        ),
        clipping=clipping(grads.terms.regions, grads.coefficient, batch.mask),
        agreement=not_run(dtype)
        if reference is None
        else agreement(grads, reference, batch.mask, dtype),
        findings=[],
        tokens=token_details(batch, view, grads) if show_tokens else None,
        metrics=loss_metrics(grads),
    )
    notes = findings(report, batch, view.logp, grads.terms.coefficient, spec.uses_advantage)
    extra = input_notes(spec, batch, grads.terms, params, grads.entropy_grad_logits is not None)
    return report.model_copy(update={"findings": notes + extra})


def zero_sum_scale(
    grads: LossGradients, view: SoftmaxView, params: LossParams, c_valid: torch.Tensor
) -> torch.Tensor:
    """[M] |c_t|, plus the gross size 2·|c_H|·a_t·H_t of the entropy bonus's cancelling terms
    Σ_v π_v·|log π_v + H| ≤ 2H: the zero-sum bound is relative to what cancels."""
    if grads.entropy_grad_logits is None:
        return c_valid
    weights = grads.agg_weights if grads.agg_weights is not None else grads.weights
    a = weights[view.rows, view.cols].to(view.entropy.dtype)
    return c_valid.abs() + 2 * abs(params.entropy_coef) * a * view.entropy


def input_notes(
    spec: LossSpec, batch: Batch, terms: LossTerms, params: LossParams, entropy: bool
) -> list[str]:
    """What a loss did in place of an input the batch lacks, and settings it could not apply."""
    notes = []
    stand_ins = {
        "ref_logp": "π_old stands in for the reference policy π_ref (set source.ref_drift, or "
        "ref_prob on literal positions)",
        "rollout_logp": "μ_old := π_old, the bypass mode: no training–inference ratio (set "
        "source.rollout_drift, or rollout_prob on literal positions)",
    }
    for need in spec.needs:
        if getattr(batch, need, None) is None and need in stand_ins:
            notes.append(f"the batch has no {need}: {stand_ins[need]}")
    if params.corrections and terms.self_aggregated:
        notes.append(
            "loss.corrections are not applied to a loss that aggregates itself: it receives "
            "rollout_logp and can weight its terms itself"
        )
    if entropy:
        notes.append(
            f"the entropy bonus (c_H = {params.entropy_coef:g}) adds a logit gradient "
            "c_H·a_t·π(log π + H) not of the form c·(e_y − π); c_t excludes it"
        )
    return notes


def parity_check(report: ParityReport) -> Check:
    """``--parity A,B`` as a pass/fail check."""
    return Check(
        name="parity",
        loss=f"{report.a.name} vs {report.b.name}",
        passed=report.passed,
        detail=(
            f"max |Δc_t| / max |c_t| = {report.coefficient_rel} ≤ {report.tolerance:.3g}; "
            f"‖∂L/∂W‖ ratio B/A = {report.grad_norm_ratio}"
        ),
    )


def findings(
    report: LossReport, batch: Batch, logp: torch.Tensor, g: torch.Tensor, uses_advantage: bool
) -> list[str]:
    """Plain-language notes on what stands out in one loss's report; ``logp`` is [N, T] ℓ."""
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
