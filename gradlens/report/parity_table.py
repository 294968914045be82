"""Rich tables for the training–inference gap, for ``--parity A,B`` and ``--parity-matrix``."""

from __future__ import annotations

import json

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.text import Text

from gradlens.report.cells import SHOWN, fmt, ok, pct, titled_table
from gradlens.report.fit import FitTable
from gradlens.results import Clipping, CompareReport, ParityMatrixReport, ParityReport


def rollout_table(report: CompareReport) -> FitTable | None:
    r = report.rollout
    if r is None:
        return None
    table = titled_table(
        "training–inference gap ρ = π_old(y)/μ_old(y) over valid tokens",
        "mean ρ",
        "min",
        "max",
        "KL k1 (μ‖π_old)",
        "KL k3",
        "mean |Δlog p|",
        "max |Δlog p|",
        keys=0,
    )
    table.add_row(
        *(fmt(v) for v in (r.rho_mean, r.rho_min, r.rho_max, r.kl_k1, r.kl_k3)),
        fmt(r.abs_diff_mean),
        fmt(r.abs_diff_max),
    )
    return table


def parity_table(p: ParityReport) -> FitTable:
    a, b = p.a, p.b
    table = titled_table(f"parity: {escape(a.name)} (A) vs {escape(b.name)} (B)", "", "A", "B")
    rows = [
        ("loss value L", fmt(a.loss), fmt(b.loss)),
        ("‖∂L/∂W‖_F", fmt(a.grad_norm), fmt(b.grad_norm)),
        ("clip region (verl pg_clipfrac)", pct(a.clipping.region), pct(b.clipping.region)),
        ("clip upper / lower", _upper_lower(a.clipping), _upper_lower(b.clipping)),
        ("dual (verl pg_clipfrac_lower)", pct(a.clipping.dual), pct(b.clipping.dual)),
        ("c_t = 0 for any reason", pct(a.clipping.zero_grad), pct(b.clipping.zero_grad)),
        ("other shares", _shares(a.clipping.shares), _shares(b.clipping.shares)),
        ("metrics", _metrics(a.metrics), _metrics(b.metrics)),
    ]
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row("‖∂L_B/∂W‖ / ‖∂L_A/∂W‖", fmt(p.grad_norm_ratio), "")
    table.add_row("max |Δc_t|", fmt(p.coefficient_max_abs_diff), "")
    table.add_row("max |Δc_t| / max |c_t|", fmt(p.coefficient_rel, 2), "")
    table.add_row("tokens differing", str(p.differing_tokens), "")
    table.add_row("max lm_head row difference (rel.)", fmt(p.row_max_rel, 2), "")
    table.add_row("tolerance", fmt(p.tolerance, 2), ok(p.passed))
    for pos in p.top:
        table.add_row(
            f"  seq {pos.sequence} pos {pos.position} (y = {pos.token}): c_A, c_B",
            fmt(pos.coefficient_a),
            fmt(pos.coefficient_b),
        )
    return table


def _upper_lower(c: Clipping) -> str:
    return f"{pct(c.upper)} / {pct(c.lower)}"


def _shares(shares: dict[str, float | None]) -> str:
    rest = {k: v for k, v in shares.items() if k not in SHOWN}
    return escape(", ".join(f"{k} {pct(v)}" for k, v in rest.items())) or "—"


def _metrics(metrics: dict[str, float | None]) -> str:
    return escape(", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())) or "—"


def rollout_and_parity_parts(report: CompareReport) -> list[RenderableType]:
    """The rollout and parity sections, where the report has them."""
    parts: list[RenderableType] = []
    rollout = rollout_table(report)
    if rollout is not None:
        parts.append(rollout)
    for p in report.parity:
        parts.append(parity_table(p))
        if p.findings:
            text = Text()
            for note in p.findings:
                text.append("• parity: ", style="bold")
                text.append(note + "\n")
            parts.append(text)
    return parts


def explanation(p: ParityReport) -> str:
    """The finding that says why a pair differs (the first one after the grad-norm line)."""
    if p.passed:
        return ""
    notes = [n for n in p.findings if not n.startswith("‖∂L/∂W‖ of")]
    return notes[0] if notes else ""


def render_parity_matrix(report: ParityMatrixReport, console: Console) -> None:
    """One line per setting and pair: the verdict, the gap, the grad-norm ratio, the reason."""
    table = titled_table(
        "parity matrix: each pair under each setting",
        "settings",
        "A vs B",
        "",
        "max |Δc_t| / max |c_t|",
        "‖∂L_B/∂W‖/‖∂L_A/∂W‖",
        "why",
        keys=2,
    )
    table.columns[-1].justify = "left"  # a sentence
    for entry in report.entries:
        settings = ", ".join(  # as YAML writes them: null, true, not None, True
            f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in entry.settings.items()
        )
        for p in entry.parity:
            table.add_row(
                escape(settings),
                escape(f"{p.a.name} vs {p.b.name}"),
                ok(p.passed),
                fmt(p.coefficient_rel, 2),
                fmt(p.grad_norm_ratio),
                escape(explanation(p)),
            )
    runs = len(report.entries)
    failed = sum(not e.passed for e in report.entries)
    summary = Text(f"{runs - failed}/{runs} settings passed every check")
    console.print(Group(table, summary))
