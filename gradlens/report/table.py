"""Rich tables for people: the losses side by side, one column each."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from gradlens.report.attribution_table import attribution_parts
from gradlens.report.cells import (
    SEED_POST_NOTE,
    agreement_cell,
    fmt,
    metrics_cell,
    ok,
    other_rules_cell,
    pct,
    titled_table,
)
from gradlens.report.fit import FitTable
from gradlens.report.mismatch_table import mismatch_parts
from gradlens.report.model_table import model_parts
from gradlens.report.parity_table import rollout_and_parity_parts
from gradlens.report.split_table import split_table
from gradlens.report.support_table import support_table
from gradlens.results import CompareReport, LossReport


def batch_panel(report: CompareReport) -> Panel:
    b, e = report.batch, report.environment
    lines = [
        f"[bold]source[/]      {escape(b.source)}",
        f"[bold]tokens[/]      {b.num_tokens} valid in {b.num_sequences} sequences; "
        f"V = {b.vocab_size}, H = {b.hidden_size}",
        f"[bold]advantages[/]  {escape(b.advantages)}; mean |A| = {fmt(b.mean_abs_advantage)}",
        f"[bold]policy[/]      mean entropy {fmt(b.mean_entropy)} nats; "
        f"mean π_θ(y) = {fmt(b.mean_sampled_prob)}",
        f"[bold]run[/]         {e.dtype} operands, {e.softmax_dtype} softmax on {e.device}; "
        f"seed {e.seed}; aggregation {report.config['loss']['aggregation']}",
    ]
    if report.engine is not None:
        g = report.engine
        detail = (
            ""
            if g.path == "materialized"
            else (
                f"; vocabulary chunks of {g.vocab_chunk}, {g.resident_chunks} kept resident, "
                f"{fmt(g.gemm_equivalents, 3)} GEMM-equivalents"
            )
        )
        lines.append(f"[bold]engine[/]      {g.path} ({escape(g.reason)}){detail}")
    return Panel("\n".join(lines), title="gradlens compare", title_align="left", expand=False)


def ratio_table(report: CompareReport) -> FitTable:
    r = report.ratio
    table = titled_table(
        "ratio r = π_θ(y)/π_old(y) over valid tokens (shared by all losses)",
        "mean",
        "min",
        "p01",
        "p05",
        "p50",
        "p95",
        "p99",
        "max",
        "KL k1",
        "KL k3",
        "non-finite",
        keys=0,
    )
    table.add_row(
        *(fmt(v) for v in (r.mean, r.min, r.p01, r.p05, r.p50, r.p95, r.p99, r.max)),
        fmt(r.kl_k1),
        fmt(r.kl_k3),
        str(r.non_finite),
    )
    return table


Row = tuple[str, Callable[[LossReport], str]]


SECTIONS: list[tuple[str, list[Row]]] = [
    (
        "loss",
        [
            ("formula (minimised)", lambda r: escape(r.formula)),
            ("g_t (c_t = a_t·g_t)", lambda r: escape(r.per_token_grad_formula)),
            ("loss value L", lambda r: fmt(r.loss)),
            ("mean |c_t|", lambda r: fmt(r.coefficient_abs_mean)),
            ("max |c_t|", lambda r: fmt(r.coefficient_abs_max)),
            ("metrics (KL, gate, reported)", metrics_cell),
        ],
    ),
    (
        "1 · logit gradient ∂L/∂z",
        [
            ("sampled row |∂L/∂z_y|: mean", lambda r: fmt(r.sampled_row.sampled_abs_mean)),
            ("  max", lambda r: fmt(r.sampled_row.sampled_abs_max)),
            ("other rows Σ_{j≠y}|∂L/∂z_j|: mean", lambda r: fmt(r.sampled_row.other_mass_mean)),
            ("other rows: largest entry", lambda r: fmt(r.sampled_row.other_abs_max)),
            ("seed post's closed form", lambda r: escape(r.sampled_row.post_formula)),
            ("  vs autograd, max rel. error", lambda r: fmt(r.sampled_row.post_max_rel_err, 2)),
        ],
    ),
    (
        "2 · lm_head rows ‖∂L/∂W_v‖",
        [
            ("total ‖∂L/∂W‖_F", lambda r: fmt(r.rows.total_norm)),
            ("sampled rows: count", lambda r: str(r.rows.sampled_rows.count)),
            ("  share of ‖·‖²", lambda r: pct(r.rows.sampled_rows.sq_share)),
            ("  max", lambda r: fmt(r.rows.sampled_rows.max)),
            ("  median", lambda r: fmt(r.rows.sampled_rows.median)),
            ("other rows: count", lambda r: str(r.rows.other_rows.count)),
            ("  share of ‖·‖²", lambda r: pct(r.rows.other_rows.sq_share)),
            ("  max", lambda r: fmt(r.rows.other_rows.max)),
            ("  median", lambda r: fmt(r.rows.other_rows.median)),
        ],
    ),
    (
        "3 · zero-sum",
        [
            ("max_t |Σ_v ∂L/∂z| / s_t", lambda r: fmt(r.zero_sum.logits_max_rel, 2)),
            ("  tolerance", lambda r: fmt(r.zero_sum.logits_tolerance, 2)),
            ("‖Σ_v ∂L/∂W_v‖ / ‖∂L/∂W‖", lambda r: fmt(r.zero_sum.weight_rel, 2)),
            ("  tolerance", lambda r: fmt(r.zero_sum.weight_tolerance, 2)),
            ("zero-sum", lambda r: ok(r.zero_sum.passed)),
        ],
    ),
    (
        "5 · clipping (share of valid tokens)",
        [
            ("upper A>0, r>1+ε_h  (TRL high)", lambda r: pct(r.clipping.upper)),
            ("lower A<0, r<1−ε_l  (TRL low)", lambda r: pct(r.clipping.lower)),
            ("region  (verl pg_clipfrac)", lambda r: pct(r.clipping.region)),
            ("dual A<0, r>c  (verl pg_clipfrac_lower)", lambda r: pct(r.clipping.dual)),
            ("OPSM: masked sequences", lambda r: pct(r.clipping.seq_masked_sequences)),
            ("  masked tokens", lambda r: pct(r.clipping.seq_masked_tokens)),
            ("c_t = 0 for any reason", lambda r: pct(r.clipping.zero_grad)),
            ("other rules (CISPO, corrections, ...)", other_rules_cell),
        ],
    ),
    (
        "6 · closed form vs autograd (max rel. error)",
        [
            ("c_t", lambda r: fmt(r.agreement.coefficient, 2)),
            ("∂L/∂z", lambda r: fmt(r.agreement.grad_logits, 2)),
            ("∂L/∂W", lambda r: fmt(r.agreement.grad_weight, 2)),
            ("tolerance", lambda r: fmt(r.agreement.tolerance, 2)),
            ("agreement", agreement_cell),
            (
                "non-finite gradient entries",
                lambda r: str(r.non_finite) if not r.non_finite else f"[bold red]{r.non_finite}[/]",
            ),
        ],
    ),
]


def losses_table(report: CompareReport) -> FitTable:
    table = titled_table("losses side by side", "", *(r.name for r in report.losses))
    table.caption = SEED_POST_NOTE
    for s, (section, rows) in enumerate(SECTIONS):
        table.add_row(f"[bold cyan]{section}[/]", *("" for _ in report.losses), end_section=False)
        for label, cell in rows:
            table.add_row(label, *(cell(r) for r in report.losses), end_section=False)
        if s < len(SECTIONS) - 1:
            table.add_section()
    return table


def top_rows_table(report: CompareReport) -> FitTable:
    table = titled_table(
        "largest lm_head gradient rows: token (‖∂L/∂W_v‖), * = sampled",
        "#",
        *(r.name for r in report.losses),
    )
    depth = max(len(r.rows.top_rows) for r in report.losses)
    for k in range(depth):
        cells = []
        for r in report.losses:
            if k < len(r.rows.top_rows):
                row = r.rows.top_rows[k]
                cells.append(f"{row.token}{'*' if row.sampled else ' '} ({fmt(row.norm, 3)})")
            else:
                cells.append("")
        table.add_row(str(k + 1), *cells)
    return table


def tokens_table(loss: LossReport) -> FitTable | None:
    if loss.tokens is None:
        return None
    table = titled_table(
        f"{loss.name}: every token",
        "seq",
        "pos",
        "y",
        "π_θ(y)",
        "π_old(y)",
        "r",
        "A",
        "a_t",
        "c_t",
        "∂L/∂z_y",
        "∂L/∂z",
        keys=3,
    )
    for t in loss.tokens:
        table.add_row(
            str(t.sequence),
            str(t.position),
            str(t.token),
            fmt(t.prob),
            fmt(t.old_prob),
            fmt(t.ratio),
            fmt(t.advantage),
            fmt(t.weight),
            fmt(t.coefficient),
            fmt(t.grad_sampled),
            "[" + ", ".join(fmt(g) for g in t.grad_logits) + "]",
        )
    return table


def findings_text(report: CompareReport) -> Text:
    text = Text()
    for r in report.losses:
        for note in r.findings:
            text.append(f"• {r.name}: ", style="bold")
            text.append(note + "\n")
    failed = [c for c in report.checks if not c.passed]
    total = len(report.checks)
    style = "bold red" if failed else "bold green"
    text.append(f"checks: {total - len(failed)}/{total} passed", style=style)
    for c in failed:
        text.append(f"\n  FAIL {c.name}{f' [{c.loss}]' if c.loss else ''}: {c.detail}", style="red")
    return text


def render_compare(report: CompareReport, console: Console) -> None:
    """Print the whole report."""
    parts: list = [
        batch_panel(report),
        ratio_table(report),
        *model_parts(report),
        losses_table(report),
        top_rows_table(report),
        *attribution_parts(report),
        *rollout_and_parity_parts(report),
        mismatch_parts(report),
        support_table(report),
        split_table(report),
    ]
    parts = [p for p in parts if p is not None]
    parts += [t for t in (tokens_table(r) for r in report.losses) if t is not None]
    parts.append(findings_text(report))
    console.print(Group(*parts))
