"""`gradlens compare` as a pure function: a validated `Config` in, a `CompareReport` out.

config → `preflight` → the source builds a `Batch` → the engine (materialized or streamed,
chosen here) runs every loss and returns one `LossRecord` each → one builder turns each into a
`LossReport` → the whole-model gradients of a real checkpoint, parity, the batch summary and
the checks → the report. No I/O here.

`preflight` makes every refusal the configuration alone decides before the source does any
work (a model loaded, rollouts sampled, a file read): an engine the device cannot run, loss
settings that need inputs the source will not have, and a source or engine whose peak memory
(`gradlens.memory`, from the shapes the source's plan gives) exceeds what is available. Once
the batch is built, the engine's estimate is checked again with its real token count.

config → the source builds a `Batch` → the engine (materialized or streamed, chosen here) runs
every loss and returns one `LossRecord` each → one builder turns each into a `LossReport` →
the whole-model gradients of a real checkpoint, parity, the batch summary and the checks →
the report. No I/O here.

With ``diagnostics.tensor_parallel`` P > 1 it runs on each rank of a P-process group, with the
same config everywhere, and returns the same report on every rank
(`gradlens.compare.tensor_parallel`: each rank holds its rows of the lm_head; only the streamed
engine runs, and ``engine: auto`` chooses it).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

import gradlens
from gradlens.compare.engines import EngineOptions, EngineRun
from gradlens.compare.findings import checks
from gradlens.compare.materialized import estimate_materialized, run_materialized
from gradlens.compare.model_grads import model_gradients
from gradlens.compare.model_report import model_report
from gradlens.compare.parity import build_parity
from gradlens.compare.records import TokenSummary, loss_report
from gradlens.compare.streamed import estimate_streamed, run_fused, run_streamed
from gradlens.compare.tensor_parallel import (
    VocabParallel,
    prepare,
    tensor_parallel_group,
    together,
)
from gradlens.config import Config
from gradlens.containers import Batch
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.mismatch import rollout_stats
from gradlens.diagnostics.mismatch_report import mismatch_report
from gradlens.diagnostics.numbers import num
from gradlens.diagnostics.ratios import ratio_stats
from gradlens.diagnostics.split import split_report
from gradlens.diagnostics.support import support_report
from gradlens.diagnostics.token_text import batch_tokenizer, token_texts
from gradlens.engine.fused import check_device
from gradlens.errors import GradlensError
from gradlens.grads import effective_old_logp, reads_entropy, replay
from gradlens.logits import softmax_dtype
from gradlens.losses import Aggregation, LossParams, LossSpec, get_loss
from gradlens.losses.corrections import missing_rollout
from gradlens.losses.distill import NO_TEACHER_HINT
from gradlens.losses.split import micro_batches
from gradlens.memory import Estimate, Shape, check_fits
from gradlens.metric_names import metric_names
from gradlens.progress import report as report_progress
from gradlens.results import BatchSummary, CompareReport, Environment
from gradlens.sources import SourceContext, build_source, plan_source
from gradlens.sources.microbatch import pass_budget

ENGINES = {"materialized": run_materialized, "streamed": run_streamed, "fused": run_fused}
REFERENCE_MODES = {"autograd": "full", "sampled": "sampled", "none": "none"}
TOKEN_DETAIL_LIMIT = 4096  # tokens × vocabulary entries printed under token_details: auto


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


def source_context(config: Config, device: torch.device, rank: int = 0) -> SourceContext:
    """The plain settings a source builder receives beside its own section (``rank``: this
    process's in the tensor-parallel group)."""
    return SourceContext(
        device=device,
        dtype=config.operand_dtype,
        seed=config.seed,
        normalization=config.advantage.normalization,
        advantage_eps=config.advantage.eps,
        params=config.loss.params(),
        aggregation=config.loss.token_aggregation(),
        memory_budget_bytes=budget_bytes(config),
        rank=rank,
        tensor_parallel=config.diagnostics.tensor_parallel,
    )


def budget_bytes(config: Config) -> int | None:
    """``diagnostics.memory_budget_mib`` in bytes; None: each pass chooses its own."""
    mib = config.diagnostics.memory_budget_mib
    return None if mib is None else int(mib * 2**20)


def choose_engine(config: Config, batch: Batch) -> tuple[str, str]:
    """("materialized" | "streamed" | "fused", why): ``diagnostics.engine``, or for ``auto`` the
    size tokens × vocabulary against ``diagnostics.stream_above``; under tensor parallelism the
    streamed engine (the config refuses the others)."""
    return choose_path(config, batch.num_tokens, batch.vocab_size)


def choose_path(config: Config, tokens: int, vocab: int) -> tuple[str, str]:
    """`choose_engine` from the sizes alone (before the batch exists: a lower bound on the
    tokens)."""
    d = config.diagnostics
    if d.engine != "auto":
        return d.engine, f"diagnostics.engine = {d.engine}"
    if d.tensor_parallel > 1:
        return "streamed", f"tensor_parallel = {d.tensor_parallel}: the vocab-parallel engine"
    entries = tokens * vocab
    if entries > d.stream_above:
        return "streamed", f"tokens × vocabulary = {entries} > {d.stream_above}"
    return "materialized", f"tokens × vocabulary = {entries} ≤ {d.stream_above}"


def engine_options(config: Config, batch: Batch, path: str) -> EngineOptions:
    """The diagnostics settings as the engine reads them (`options_for` the batch's sizes)."""
    return options_for(config, batch.num_tokens, batch.vocab_size, path)


def options_for(config: Config, tokens: int, vocab: int, path: str) -> EngineOptions:
    """The diagnostics settings as the engine reads them; ``reference: auto`` is decided here:
    full autograd with the materialized engine, sampled with the streamed ones (full autograd
    would materialise [tokens, vocab] per loss) and under tensor parallelism (the sampled check
    gathers only the sampled rows of W there), none for the streamed engines on a replayed batch
    (the sampled check knows no kept sets); so is ``attribution: auto``: on with the materialized
    engine (its [M, V] and [V, H] tensors are there already), off with the streamed ones (about
    one more GEMM-equivalent per loss)."""
    d = config.diagnostics
    details = d.token_details
    small = tokens * vocab <= TOKEN_DETAIL_LIMIT
    replayed = config.loss.sampling_support == "kept"
    if d.reference == "sampled" and replayed:
        raise GradlensError(
            "diagnostics.reference: 'sampled' differentiates the softmax over the whole "
            "vocabulary, not the replayed kept sets of loss.sampling_support 'kept'; use "
            "reference autograd (materialized engine), auto or none"
        )
    if d.reference != "auto":
        reference = REFERENCE_MODES[d.reference]
    elif replayed and path != "materialized":
        reference = "none"
    else:
        reference = "full" if path == "materialized" else "sampled"
    return EngineOptions(
        top_k=d.top_k,
        token_details=path == "materialized" and (details == "on" or (details == "auto" and small)),
        reference=reference,
        memory_budget_bytes=budget_bytes(config),
        vocab_chunk=d.vocab_chunk,
        attribution=d.attribution == "on" or (d.attribution == "auto" and path == "materialized"),
    )


def engine_estimate(config: Config, shape: Shape, losses: int, device: torch.device) -> Estimate:
    """The peak memory of the engine ``config`` chooses for a batch of ``shape``."""
    path, _ = choose_path(config, shape.tokens, shape.vocab)
    options = options_for(config, shape.tokens, shape.vocab, path)
    if path == "materialized":
        return estimate_materialized(
            shape, config.operand_dtype, options.reference != "none", options.attribution
        )
    entropy = config.loss.entropy_coef != 0.0
    return estimate_streamed(shape, config.operand_dtype, losses, options, device, entropy)


def run_specs(config: Config) -> list[LossSpec]:
    """Every loss the run evaluates: ``losses`` and those of the parity pairs."""
    names = list(config.losses)
    if config.parity is not None:
        names += [name for pair in config.parity.pairs for name in pair]
    return [get_loss(name) for name in dict.fromkeys(names)]


def preflight(config: Config, device: torch.device) -> None:
    """Every refusal the configuration alone decides, before the source does any work (see
    the module docstring)."""
    if config.diagnostics.engine == "fused":
        check_device(device)
    specs = run_specs(config)
    plan = plan_source(config.source, source_context(config, device))
    corrections = config.loss.params().corrections
    if (
        corrections
        and plan.provides is not None
        and "rollout_logp" not in plan.provides
        and any(spec.aggregating_fn is None for spec in specs)  # others weight themselves
    ):
        raise GradlensError(missing_rollout(corrections))
    if config.loss.distill is not None and plan.provides is not None:
        check_teacher_source(config.loss.distill.form, config.source.kind, plan.provides)
    if config.split is not None and plan.shape is not None:  # N is known: refused now, not
        micro_batches(config.split.plain(), plan.shape.sequences)  # after a rollout
    for estimate in plan.memory:
        check_fits(estimate, device)
    if plan.shape is not None:
        ranks = config.diagnostics.tensor_parallel  # each rank holds its rows of the lm_head
        shape = dataclasses.replace(plan.shape, vocab=-(-plan.shape.vocab // ranks))
        check_fits(engine_estimate(config, shape, len(specs) + 1, device), device)


def check_teacher_source(form: str, kind: str, provides: frozenset[str]) -> None:
    """Refuse ``loss.distill`` before any work when the source will give no teacher, or only
    stored top-k log-probs for the full form."""
    if "teacher" not in provides:
        raise GradlensError(
            f"loss.distill needs a teacher, and this source.kind {kind!r} gives none; "
            f"{NO_TEACHER_HINT}, or unset loss.distill"
        )
    if form == "full" and "teacher_full" not in provides:
        raise GradlensError(
            "loss.distill.form: 'full' needs the teacher's whole distribution (teacher_hidden "
            "and teacher_weight, or teacher_logits); this source gives only stored top-k "
            "log-probs, which give form top_k"
        )


def summarize_batch(batch: Batch, tokens: TokenSummary) -> BatchSummary:
    """The batch in a few numbers."""
    m = batch.mask
    empty = tokens.entropy.numel() == 0
    return BatchSummary(
        source=batch.source,
        num_sequences=batch.num_sequences,
        num_tokens=batch.num_tokens,
        vocab_size=batch.vocab_size,
        hidden_size=batch.hidden_size,
        advantages=batch.advantage_note,
        mean_entropy=None if empty else num(tokens.entropy.mean()),
        mean_sampled_prob=None if empty else num(tokens.sampled_probs.mean()),
        mean_abs_advantage=None if empty else num(batch.advantages[m].abs().mean()),
        logp_max=None if empty else num(batch.old_logp[m].max()),
    )


def environment(config: Config, device: torch.device) -> Environment:
    dtype = config.operand_dtype
    return Environment(
        gradlens=gradlens.__version__,
        python=sys.version.split()[0],
        torch=torch.__version__,
        platform=platform.platform(),
        device=str(device),
        dtype=config.dtype,
        softmax_dtype=str(softmax_dtype(dtype)).removeprefix("torch."),
        seed=config.seed,
    )


def run_compare(config: Config, group: dist.ProcessGroup | None = None) -> CompareReport:
    """Run every loss of ``config`` on the batch its source builds and diagnose it.

    ``group``: with ``diagnostics.tensor_parallel`` P > 1, the process group of the P ranks
    (None: the default group, as torchrun and `torch.distributed.init_process_group` make it);
    every rank calls this with the same config and gets the same report. Ignored for P = 1.
    """
    device = resolve_device(config.device)
    preflight(config, device)
    comm = tensor_parallel_group(config.diagnostics.tensor_parallel, group)
    ctx = source_context(config, device, 0 if comm is None else comm.rank)
    if comm is None:
        return compare_batch(build_source(config.source, ctx), config, device)
    batch, parallel = prepare(lambda: build_source(config.source, ctx), comm, device)
    return compare_batch(batch, config, device, parallel)


def compare_batch(
    batch: Batch, config: Config, device: torch.device, parallel: VocabParallel | None = None
) -> CompareReport:
    """Run every loss of ``config`` on ``batch`` and diagnose it (``config.source`` unused).

    ``parallel``: with ``diagnostics.tensor_parallel`` > 1, this rank's group as
    `gradlens.compare.tensor_parallel.prepare` returns it (``batch`` then holds the rank's rows
    of W); `run_compare` prepares it.
    """
    if parallel is None and config.diagnostics.tensor_parallel > 1:
        raise GradlensError(
            f"diagnostics.tensor_parallel: {config.diagnostics.tensor_parallel} ranks run through "
            "gradlens compare under torchrun or run_compare(config, group), which split the "
            "lm_head over the group; this call runs in one process: set tensor_parallel 1"
        )
    params = config.loss.params()
    aggregation = config.loss.token_aggregation()
    stored = batch  # the source's batch: log-probs over the whole vocabulary
    if config.loss.sampling_support == "kept":
        batch = replay(batch)
    path, reason = choose_engine(config, batch)
    rows = int(batch.weight.shape[0])  # the rows this process holds (all but under TP)
    shape = Shape(
        batch.num_sequences, int(batch.mask.shape[1]), rows, batch.hidden_size, batch.num_tokens
    )
    check_fits(engine_estimate(config, shape, len(run_specs(config)) + 1, device), device)
    specs = [get_loss(name) for name in config.losses]
    pairs = [] if config.parity is None else config.parity.pairs
    pair_specs = [(get_loss(a), get_loss(b)) for a, b in pairs]
    options = engine_options(config, batch, path)
    long_run = batch.model_context is not None  # a real checkpoint: report the phase
    if long_run:
        report_progress("lm_head diagnostics", 0, 1)
    run: EngineRun
    if parallel is None:
        run = ENGINES[path](batch, specs, params, aggregation, options, reason, pair_specs)
    else:  # the config allows no other engine under tensor parallelism
        run = run_streamed(
            batch, specs, params, aggregation, options, reason, pair_specs, parallel=parallel
        )
    if long_run:
        report_progress("lm_head diagnostics", 1, 1)
    with _phase(parallel, "report"):
        report = _report(config, device, batch, run, params, aggregation, specs, options)
    if stored.kept is not None:  # after the phase: under tensor parallelism it has a collective
        support = support_report(
            stored,
            stored.kept,
            batch.replayed,
            params.eps_low,
            params.eps_high,
            None if parallel is None else parallel.comm,
        )
        report = report.model_copy(update={"support": support})
    return report


def _phase(parallel: VocabParallel | None, step: str) -> AbstractContextManager[None]:
    """Under tensor parallelism the ranks exchange the phase's errors at its end."""
    if parallel is None:
        return nullcontext()
    return together(parallel.comm, step, parallel.device)


def _report(
    config: Config,
    device: torch.device,
    batch: Batch,
    run: EngineRun,
    params: LossParams,
    aggregation: Aggregation,
    specs: list[LossSpec],
    options: EngineOptions,
) -> CompareReport:
    """Everything after the engine: the loss reports, the model sections, parity, the split,
    checks."""
    logp = run.tokens.logp
    tokenizer = batch_tokenizer(batch)
    texts = None
    wanted = batch.rollout_logp is not None or any(r.attribution is not None for r in run.records)
    if tokenizer is not None and wanted:
        texts = token_texts(batch, tokenizer)
    top_k = config.diagnostics.top_k
    reports = [loss_report(r, batch, logp, params, top_k, texts) for r in run.records]
    model = None
    ctx = batch.model_context
    if ctx is not None:
        model = model_report(ctx, batch, params)
        if ctx.whole_model:  # a real checkpoint: each loss through the network
            budget = pass_budget(budget_bytes(config), device)
            sft_over_rl, reports, grad_pass = model_gradients(
                batch, ctx, run.tokens, reports, params, aggregation, budget
            )
            model = model.model_copy(
                update={"sft_over_rl": sft_over_rl, "gradient_pass": grad_pass}
            )
    summary = summarize_batch(batch, run.tokens)
    parity = []
    if config.parity is not None:
        tolerance = config.parity.tolerance or tolerances.agreement(config.operand_dtype)
        parity = [build_parity(batch, logp, p, aggregation, tolerance) for p in run.parity]
    split = None
    if config.split is not None:
        split = split_report(
            batch,
            logp,
            specs,
            params,
            aggregation,
            config.split.plain(),
            config.split.convention,
            options.memory_budget_bytes,
            options.vocab_chunk,
            entropy=run.tokens.entropy_grid(batch.mask) if reads_entropy(specs, params) else None,
        )
    all_checks = checks(summary, reports, parity, batch.origin.name("mask", ()), split)
    return CompareReport(
        environment=environment(config, device),
        config=config.model_dump(mode="json"),
        batch=summary,
        ratio=ratio_stats(logp, effective_old_logp(batch, logp), batch.mask),
        losses=reports,
        checks=all_checks,
        passed=all(c.passed for c in all_checks),
        model=model,
        rollout=None
        if batch.rollout_logp is None
        else rollout_stats(effective_old_logp(batch, logp), batch.rollout_logp, batch.mask),
        mismatch=None
        if batch.rollout_logp is None
        else mismatch_report(
            effective_old_logp(batch, logp),
            batch.rollout_logp,
            batch.mask,
            top_k,
            params.corrections,
            texts,
        ),
        parity=parity,
        split=split,
        engine=run.info,
        metric_names=metric_names(),
    )
