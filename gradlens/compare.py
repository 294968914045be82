"""`gradlens compare` as a pure function: a validated `Config` in, a `CompareReport` out.

config → source builds a `Batch` → one shared `SoftmaxView` → for each loss: closed-form
gradients, the autograd reference, and the six diagnostics → checks → report. No I/O here.
"""

from __future__ import annotations

import platform
import sys

import torch

import gradlens
from gradlens.config import Config
from gradlens.containers import Batch
from gradlens.diagnostics.agreement import agreement
from gradlens.diagnostics.clipping import clipping
from gradlens.diagnostics.numbers import count_non_finite, num
from gradlens.diagnostics.ratios import ratio_stats
from gradlens.diagnostics.row_norms import row_norms
from gradlens.diagnostics.sampled_row import sampled_row
from gradlens.diagnostics.tokens import token_details
from gradlens.diagnostics.zero_sum import zero_sum
from gradlens.errors import GradlensError
from gradlens.grads import (
    Aggregation,
    SoftmaxView,
    autograd_reference,
    closed_form,
    effective_old_logp,
    softmax_view,
)
from gradlens.logits import softmax_dtype
from gradlens.losses import LossParams, get_loss
from gradlens.results import BatchSummary, Check, CompareReport, Environment, LossReport
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
    c = config.loss
    return LossParams(c.eps_low, c.eps_high, c.dual_clip, c.opsm_delta)


def summarize_batch(batch: Batch, view: SoftmaxView) -> BatchSummary:
    m = batch.mask
    empty = view.tokens.numel() == 0
    return BatchSummary(
        source=batch.source,
        num_sequences=batch.num_sequences,
        num_tokens=batch.num_tokens,
        vocab_size=batch.vocab_size,
        hidden_size=batch.hidden_size,
        advantages=batch.advantage_note,
        mean_entropy=None if empty else num(view.entropy.mean()),
        mean_sampled_prob=None if empty else num(view.sampled_probs.mean()),
        mean_abs_advantage=None if empty else num(batch.advantages[m].abs().mean()),
        logp_max=None if empty else num(batch.old_logp[m].max()),
    )


def run_compare(config: Config) -> CompareReport:
    """Run every loss of ``config`` on one batch and diagnose it."""
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    batch = build_batch(config, device, dtype)
    view = softmax_view(batch)
    params = loss_params(config)
    agg = Aggregation(config.loss.aggregation, config.loss.loss_scale_factor)
    details = config.diagnostics.token_details
    show_tokens = details == "on" or (
        details == "auto" and batch.num_tokens * batch.vocab_size <= TOKEN_DETAIL_LIMIT
    )

    reports = [
        diagnose_loss(name, batch, view, params, agg, config, dtype, show_tokens)
        for name in config.losses
    ]
    summary = summarize_batch(batch, view)
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
            Check(
                name="agreement",
                loss=r.name,
                passed=r.agreement.passed,
                detail=(
                    f"closed form vs autograd: c {r.agreement.coefficient}, "
                    f"∂L/∂z {r.agreement.grad_logits}, ∂L/∂W {r.agreement.grad_weight} "
                    f"≤ {r.agreement.tolerance:.3g}"
                ),
            ),
        ]
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
        ratio=ratio_stats(view.logp, effective_old_logp(batch, view.logp), batch.mask),
        losses=reports,
        checks=checks,
        passed=all(c.passed for c in checks),
    )


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
    reference = autograd_reference(batch, spec, params, agg)
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
        reference_non_finite=count_non_finite(reference.grad_logits, reference.grad_weight),
        sampled_row=sampled_row(view, grads, reference.grad_logits, spec.post_formula),
        rows=row_norms(grads.grad_weight, view.tokens, config.diagnostics.top_k),
        zero_sum=zero_sum(grads.grad_logits, grads.grad_weight, c_valid, view.hidden, view.logits),
        clipping=clipping(grads.terms.regions, grads.coefficient, batch.mask),
        agreement=agreement(grads, reference, batch.mask, dtype),
        findings=[],
        tokens=token_details(batch, view, grads) if show_tokens else None,
    )
    return report.model_copy(
        update={
            "findings": findings(report, batch, view, grads.terms.coefficient, spec.uses_advantage)
        }
    )


def findings(
    report: LossReport, batch: Batch, view: SoftmaxView, g: torch.Tensor, uses_advantage: bool
) -> list[str]:
    """Plain-language notes on what stands out in one loss's report."""
    notes = []
    if report.non_finite:
        log_r = (view.logp - batch.old_logp)[batch.mask]
        notes.append(
            f"{report.non_finite} gradient entries are NaN or inf; the largest log-ratio "
            f"log(π_θ/π_old) is {float(log_r.max()):.4g}, so r = e^that overflows "
            f"{str(view.logits.dtype).removeprefix('torch.')}"
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
