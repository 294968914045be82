"""Rich tables of a real checkpoint: rollout, mismatch, staleness, whole-model gradients.

Rendered only when the report has a ``model`` section: the model source, with every section,
or a batch file recomputed by a checkpoint (``source.model_path``), with the checkpoint and the
whole-model gradients only.
"""

from __future__ import annotations

from rich.markup import escape
from rich.panel import Panel

from gradlens.report.cells import SEED_POST_NOTE, fmt, pct, titled_table
from gradlens.report.fit import FitTable
from gradlens.results import CompareReport, ModelPass

SAMPLES_SHOWN = 4
SAMPLE_CHARS = 70


def _one_line(text: str, limit: int = SAMPLE_CHARS) -> str:
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def model_panel(report: CompareReport) -> Panel:
    assert report.model is not None
    m, r = report.model.model, report.model.rollout
    lines = [
        f"[bold]checkpoint[/]  {escape(m.path)}: {escape(m.architecture)}, "
        f"{m.parameters / 1e6:.2f}M parameters, {m.layers} layers, H = {m.hidden_size}, "
        f"V = {m.vocab_size} (tokenizer {m.tokenizer_size}), context {m.context}"
        + (", tied input/output embeddings" if m.tied_embeddings else "")
        + (", lm_head bias" if m.lm_head_bias else ""),
    ]
    if r is None:  # a batch file: the checkpoint recomputed its hidden states
        lines.append(
            f"[bold]batch file[/]  {escape(report.model.batch_file or '?')}: "
            f"{report.batch.num_sequences} sequences, {report.batch.num_tokens} response tokens "
            f"in the loss, run through the checkpoint in {m.train_dtype} (no rollout, mismatch "
            "or staleness: those are the model source's)"
        )
        return Panel(
            "\n".join(lines), title="checkpoint (batch file)", title_align="left", expand=False
        )
    lines += [
        f"[bold]rollout[/]     {r.prompts} prompts × {r.group_size} completions, "
        f"≤ {r.max_new_tokens} new tokens at T = {r.temperature}, top-p {r.top_p}"
        f"{f', top-k {r.top_k}' if r.top_k else ''}; "
        f"{r.completion_tokens} completion tokens (mean {r.mean_completion_length:.1f}), "
        f"{r.stopped_at_eos} ended at EOS",
        f"[bold]reward[/]      {escape(r.reward)}: mean {fmt(r.mean_reward)}, std "
        f"{fmt(r.reward_std)}",
        f"[bold]log-probs[/]   {escape(r.logp_definition)}",
    ]
    for s in r.samples[:SAMPLES_SHOWN]:
        lines.append(
            f"  #{s.sequence} reward {fmt(s.reward, 3)}: [dim]{escape(_one_line(s.prompt, 40))}[/]"
            f"{escape(_one_line(s.completion))}"
        )
    return Panel("\n".join(lines), title="model source", title_align="left", expand=False)


def mismatch_table(report: CompareReport) -> FitTable:
    assert report.model is not None and report.model.mismatch is not None
    x = report.model.mismatch
    table = titled_table(
        f"training–inference mismatch: μ ({x.rollout_dtype} rollout pass) vs π_old "
        f"({x.train_dtype} training pass), ρ = π_old/μ over {x.count} tokens",
        "mean |Δlog p|",
        "RMS",
        "max",
        "KL k1",
        "KL k3",
        "ρ min",
        "p01",
        "p05",
        "p50",
        "p95",
        "p99",
        "ρ max",
        keys=0,
    )
    table.add_row(
        *(
            fmt(v)
            for v in (
                x.abs_diff_mean,
                x.rms_diff,
                x.abs_diff_max,
                x.kl_k1,
                x.kl_k3,
                x.rho_min,
                x.rho_p01,
                x.rho_p05,
                x.rho_p50,
                x.rho_p95,
                x.rho_p99,
                x.rho_max,
            )
        )
    )
    return table


def staleness_table(report: CompareReport) -> FitTable:
    assert report.model is not None and report.model.staleness is not None
    s = report.model.staleness
    how = (
        f"lr {s.lr:g}"
        if s.target_kl is None
        else f"target KL {s.target_kl:g}: lr searched from {s.lr:g}"
    )
    ran = pass_text(s.model_pass)
    table = titled_table(
        f"staleness: r = π_θk/π_old after k {s.optimizer} steps ({how}) on {s.loss}; "
        f"the diagnosis runs at k = {s.steps}" + (f"\n{ran}" if ran else ""),
        "k",
        "lr (tries)",
        "loss",
        "r mean",
        "min",
        "p05",
        "p50",
        "p95",
        "max",
        "KL k3",
        "clip upper",
        "clip lower",
        "pg_clipfrac",
    )
    for t in s.trajectory:
        subset = f", {t.subset_probes} on a subset" if t.subset_probes else ""
        tries = f" ({t.probes + 1} tried{subset})" if t.probes else ""
        table.add_row(
            str(t.step),
            "—" if t.lr is None else f"{t.lr:.3g}{tries}",
            fmt(t.loss),
            *(fmt(v) for v in (t.ratio_mean, t.ratio_min, t.ratio_p05, t.ratio_p50)),
            *(fmt(v) for v in (t.ratio_p95, t.ratio_max, t.kl_k3)),
            pct(t.clip_upper),
            pct(t.clip_lower),
            pct(t.clip_region),
        )
    return table


def pass_text(p: ModelPass | None) -> str:
    """How a pass through the model ran, in a few words."""
    if p is None:
        return ""
    over = ", a sequence over the budget" if p.over_budget else ""
    lowered = f" in {p.recompute_dtype} (autocast)" if p.recompute_dtype else ""
    ckpt = f", blocks recomputed in the backward{lowered}" if p.checkpointed else ""
    packed = (
        f", {p.positions} of {p.padded_positions} positions (completions after one copy of "
        "their prompt)"
        if p.shared_prefix
        else ""
    )
    replay = ", the blocks' inputs from the stale steps' last forward" if p.replayed_forward else ""
    return (
        f"{p.micro_batches} micro-batch(es), {p.forwards} forward(s) and {p.backwards} "
        f"backward(s){ckpt}{replay}{packed}; budget {mib(p.budget_bytes)} MiB, "
        f"{p.bytes_per_sequence / 2**20:.1f} MiB kept per sequence{over}"
    )


def model_grads_table(report: CompareReport) -> FitTable:
    losses = [r for r in report.losses if r.model_grads is not None]
    at = "at the checkpoint" if report.model and report.model.source == "batch" else "at θ_k"
    ran = pass_text(report.model.gradient_pass if report.model else None)
    table = titled_table(
        f"whole-model gradient norms per tensor group (same batch, {at})"
        + (f"\n{ran}" if ran else ""),
        "",
        *(r.name for r in losses),
    )
    table.caption = SEED_POST_NOTE
    names = list(dict.fromkeys(g.name for r in losses for g in r.model_grads.groups))  # type: ignore[union-attr]
    for name in names:
        cells = []
        for r in losses:
            assert r.model_grads is not None
            norms = {g.name: g.norm for g in r.model_grads.groups}
            cells.append(fmt(norms.get(name)))
        label = name + ("  (logit path)" if name == "lm_head" else "")
        table.add_row(label, *cells)
    tied = any(r.model_grads.tied for r in losses if r.model_grads is not None)
    table.add_section()
    totals = [fmt(r.model_grads.total_norm) if r.model_grads else "—" for r in losses]
    table.add_row("[bold]total ‖∇L‖[/] (trainer grad_norm)", *totals)
    if tied:
        table.add_row(
            "tied: ‖.grad‖ of embedding = lm_head",
            *(fmt(r.model_grads.tied_grad_norm) for r in losses),  # type: ignore[union-attr]
        )
    table.add_section()
    table.add_row("[bold cyan]seed post's estimate[/]", *("" for _ in losses))
    rows = [
        ("formula", lambda p: escape(p.formula)),
        ("from", lambda p: escape(p.inputs)),
        ("predicted", lambda p: fmt(p.predicted)),
        ("measured total ‖∇L‖", lambda p: fmt(p.measured)),
        ("measured / predicted", lambda p: fmt(p.ratio, 3)),
        ("per token mean |g|·(1 − π_y)", lambda p: fmt(p.per_token)),
        (
            "within the factor",
            lambda p: (
                f"[green]yes ({p.threshold:g}×)[/]"
                if p.agrees
                else f"[bold red]no ({p.threshold:g}×)[/]"
            ),
        ),
    ]
    for label, cell in rows:
        table.add_row(
            label,
            *(
                cell(r.model_grads.prediction)
                if r.model_grads and r.model_grads.prediction
                else "—"
                for r in losses
            ),
        )
    return table


def sft_over_rl_table(report: CompareReport) -> FitTable | None:
    assert report.model is not None
    if not report.model.sft_over_rl:
        return None
    table = titled_table(
        "the seed post's claim: SFT's grad-norm over RL's (≈ an order of magnitude)",
        "pair",
        "estimate",
        "measured",
    )
    table.caption = SEED_POST_NOTE
    for x in report.model.sft_over_rl:
        table.add_row(f"{x.sft} / {x.rl}", fmt(x.predicted, 3), fmt(x.measured, 3))
    return table


def notes_panel(report: CompareReport) -> Panel | None:
    """What stands out about the checkpoint and its batch (``model.notes``)."""
    assert report.model is not None
    if not report.model.notes:
        return None
    text = "\n".join(f"• {escape(n)}" for n in report.model.notes)
    return Panel(text, title="notes on the checkpoint", title_align="left", expand=False)


def model_parts(report: CompareReport) -> list:
    """The sections of the checkpoint, in reading order; empty without one."""
    if report.model is None:
        return []
    parts: list = [model_panel(report)]
    notes = notes_panel(report)
    if notes is not None:
        parts.append(notes)
    if report.model.mismatch is not None:
        parts.append(mismatch_table(report))
    if report.model.staleness is not None:
        parts.append(staleness_table(report))
    if any(r.model_grads is not None for r in report.losses):
        parts.append(model_grads_table(report))
    extra = sft_over_rl_table(report)
    if extra is not None:
        parts.append(extra)
    return parts


def mib(size: int) -> str:
    """Bytes in MiB as the pass lines show them: whole above 1 MiB, 3 digits below (0.3)."""
    value = size / 2**20
    return f"{value:.0f}" if value >= 1 else f"{value:.3g}"
