"""Rich tables of the attribution sections: where each loss's lm_head update comes from.

One table puts the losses side by side (the group shares, the concentration over sequences, the
entropy change of one step); two list the largest token and sequence shares; with a tokenizer,
one per loss shows its largest tokens in context. Nothing is drawn for a report without
attribution.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from rich.markup import escape

from gradlens.report.cells import fmt, pct, titled_table
from gradlens.report.fit import FitTable
from gradlens.results import AttributedToken, Attribution, CompareReport, LossReport

CONTEXT_ROWS = 5  # tokens shown in context per loss
GROUP_TITLES = {
    "advantage_sign": "by sign of A",
    "component": "by loss term",
    "region": "by clip/mask region (first region)",
    "prob_bucket": "by π_θ(y)",
    "position": "by position in the completion",
}
SIGN_LABELS = {"positive": "A > 0", "negative": "A < 0", "zero": "A = 0"}


def visible(text: str) -> str:
    """Decoded text on one line: newlines and tabs shown, markup escaped."""
    return escape(text.replace("\n", "⏎").replace("\t", "⇥"))


def _keys(losses: list[LossReport], group: str) -> list[str]:
    """The names of a group over every loss, in first-seen order."""
    keys: dict[str, None] = {}
    for r in losses:
        if r.attribution is not None:
            keys.update(dict.fromkeys(r.attribution.groups[group].shares))
    return list(keys)


def _cell(r: LossReport, get: Callable[[Attribution], str]) -> str:
    return "not run" if r.attribution is None else get(r.attribution)


def _group_cell(a: Attribution, group: str, key: str) -> str:
    part = a.groups[group]
    if key not in part.shares:
        return "—"
    return f"{pct(part.shares[key])} ({part.tokens[key]})"


def _half(a: Attribution, sequences: int) -> str:
    if a.sequences_to_half is None:
        return "—"
    return f"{a.sequences_to_half} of {sequences} sequences ({pct(a.sequences_to_half_share)})"


def _rate(field: str, a: Attribution) -> str:
    return fmt(getattr(a.entropy, field))


def _rate_by_sign(field: str, a: Attribution) -> str:
    return " / ".join(fmt(v, 3) for v in getattr(a.entropy, f"{field}_by_sign").values())


def _token_label(t: AttributedToken) -> str:
    word = f" {visible(repr(t.text))}" if t.text is not None else f" #{t.token}"
    return f"s{t.sequence}:{t.position}{word}"


def shares_table(report: CompareReport) -> FitTable:
    losses = report.losses
    table = titled_table(
        "attribution: shares ⟨part, G⟩/‖G‖² of each loss's lm_head update G = ∂L/∂W "
        "(tokens in brackets; docs/attribution.md)",
        "",
        *(r.name for r in losses),
    )
    n = report.batch.num_sequences

    def section(title: str) -> None:
        table.add_row(f"[bold cyan]{title}[/]", *("" for _ in losses), end_section=False)

    section("sequences and tokens")
    rows: list[tuple[str, Callable[[Attribution], str]]] = [
        ("‖G‖² / Σ_t share_t", lambda a: f"{fmt(a.grad_norm_sq)} / {fmt(a.share_sum, 6)}"),
        ("half the update from", lambda a: _half(a, n)),
        (
            "largest sequence share",
            lambda a: (
                "—"
                if not a.top_sequences
                else f"s{a.top_sequences[0].sequence} {pct(a.top_sequences[0].share)}"
            ),
        ),
        (
            "largest token share",
            lambda a: (
                "—"
                if not a.top_tokens
                else f"{_token_label(a.top_tokens[0])} {pct(a.top_tokens[0].share)}"
            ),
        ),
    ]
    for label, get in rows:
        table.add_row(label, *(_cell(r, get) for r in losses), end_section=False)
    for group, title in GROUP_TITLES.items():
        table.add_section()
        section(title)
        for key in _keys(losses, group):
            label = SIGN_LABELS.get(key, key)
            table.add_row(
                escape(label),
                *(_cell(r, partial(_group_cell, group=group, key=key)) for r in losses),
                end_section=False,
            )
    table.add_section()
    section("entropy change of one step, mean dH/dη (nats per unit η)")
    for label, field in (
        ("lm_head step ΔW = −η·∂L/∂W", "lm_head"),
        ("logit step Δz_t = −η·∂L/∂z_t", "logit"),
    ):
        table.add_row(label, *(_cell(r, partial(_rate, field)) for r in losses), end_section=False)
        table.add_row(
            "  from A > 0 / A < 0 / A = 0",
            *(_cell(r, partial(_rate_by_sign, field)) for r in losses),
            end_section=False,
        )
    return table


def top_tokens_table(report: CompareReport) -> FitTable:
    losses = [r for r in report.losses if r.attribution is not None]
    table = titled_table(
        "largest token shares: sequence:position token share (|share| order)",
        "#",
        *(r.name for r in losses),
    )
    depth = max(len(r.attribution.top_tokens) for r in losses if r.attribution is not None)
    for k in range(depth):
        cells = []
        for r in losses:
            assert r.attribution is not None
            top = r.attribution.top_tokens
            cells.append("" if k >= len(top) else f"{_token_label(top[k])} {pct(top[k].share)}")
        table.add_row(str(k + 1), *cells)
    return table


def top_sequences_table(report: CompareReport) -> FitTable:
    losses = [r for r in report.losses if r.attribution is not None]
    table = titled_table(
        "largest sequence shares: sequence share (‖G_i‖, mean A)", "#", *(r.name for r in losses)
    )
    depth = max(len(r.attribution.top_sequences) for r in losses if r.attribution is not None)
    for k in range(depth):
        cells = []
        for r in losses:
            assert r.attribution is not None
            top = r.attribution.top_sequences
            if k >= len(top):
                cells.append("")
                continue
            s = top[k]
            cells.append(f"s{s.sequence} {pct(s.share)} ({fmt(s.norm, 3)}, {fmt(s.advantage, 3)})")
        table.add_row(str(k + 1), *cells)
    return table


def context_table(loss: LossReport) -> FitTable | None:
    """The loss's largest token shares with their decoded context, or None without text."""
    a = loss.attribution
    if a is None or not a.top_tokens or a.top_tokens[0].context is None:
        return None
    table = titled_table(
        f"{loss.name}: largest token shares in context («token»)",
        "seq:pos",
        "share",
        "‖g_t‖‖h_t‖",
        "A",
        "π_θ(y)",
        "r",
        "region",
        "context",
    )
    table.columns[0].justify = "right"
    table.columns[-1].justify = "left"
    for t in a.top_tokens[:CONTEXT_ROWS]:
        table.add_row(
            f"{t.sequence}:{t.position}",
            pct(t.share),
            fmt(t.norm, 3),
            fmt(t.advantage, 3),
            fmt(t.prob, 3),
            fmt(t.ratio, 3),
            escape(t.region),
            visible(t.context or ""),
        )
    return table


def attribution_parts(report: CompareReport) -> list[FitTable]:
    """The attribution tables of a report ([] when no loss has an attribution section)."""
    if all(r.attribution is None for r in report.losses):
        return []
    parts = [shares_table(report), top_tokens_table(report), top_sequences_table(report)]
    parts += [t for t in (context_table(r) for r in report.losses) if t is not None]
    return parts
