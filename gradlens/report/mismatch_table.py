"""Rich tables of the ``mismatch`` section: the frameworks' statistics of the gap, where it lives
(by π_old, by position) and the worst tokens with what each correction does to them."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape

from gradlens.report.cells import fmt, pct, titled_table
from gradlens.report.fit import FitTable
from gradlens.results import CompareReport, MismatchBucket, MismatchReport

CONTEXT_CHARS = 40
ACTION_MARK = {"kept": "", "truncated": "→", "masked": "✗"}


def _short(text: str | None, limit: int = CONTEXT_CHARS) -> str:
    if text is None:
        return "—"
    flat = text.replace("\n", "⏎")
    return escape(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def statistics_table(m: MismatchReport) -> FitTable:
    s = m.statistics
    table = titled_table(
        f"training–inference gap over {s.count} tokens of {s.sequences} sequences, "
        "under the frameworks' names (verl rollout_corr/…, NeMo RL …_error)",
        "statistic",
        "value",
        "statistic",
        "value",
        keys=0,
    )
    cells = [
        ("kl (k1)", s.kl),
        ("k2_kl", s.k2_kl),
        ("k3_kl = gen_kl_error", s.k3_kl),
        ("policy_kl_error", s.reverse_k3_kl),
        ("js_divergence_error", s.js_divergence),
        ("token_mult_prob_error", s.mult_prob_error),
        ("training_ppl", s.training_ppl),
        ("rollout_ppl", s.rollout_ppl),
        ("log_ppl_diff", s.log_ppl_diff),
        ("ppl_ratio", s.ppl_ratio),
        ("chi2_token", s.chi2_token),
        ("chi2_seq", s.chi2_seq),
        (f"ESS (TIS ≤ {fmt(s.ess_cap)})", s.ess),
        ("ESS (raw ρ)", s.ess_raw),
        ("pearson (log-probs)", s.pearson_logp),
        ("pearson (probs)", s.pearson_prob),
        ("probs_diff mean", s.prob_diff_mean),
        ("probs_diff max", s.prob_diff_max),
    ]
    ideal_one = ("ppl_ratio", "ESS", "pearson", "token_mult_prob_error")  # 1 when μ = π_old
    shown = [(n, around_one(x) if n.startswith(ideal_one) else fmt(x)) for n, x in cells]
    for i in range(0, len(shown), 2):
        (a, x_text), (b, y_text) = shown[i], shown[i + 1]
        table.add_row(a, x_text, b, y_text)
    table.add_row(f"ρ outside [{fmt(s.band_low)}, {fmt(s.band_high)}]", pct(s.outside_band), "", "")
    return table


def buckets_table(title: str, head: str, buckets: list[MismatchBucket]) -> FitTable:
    table = titled_table(title, head, "tokens", "mean |Δ|", "ρ outside band", "share of k3")
    for b in buckets:
        table.add_row(
            escape(b.label),
            str(b.count),
            fmt(b.abs_diff_mean),
            pct(b.outside_band),
            pct(b.k3_share),
        )
    return table


def worst_table(m: MismatchReport) -> FitTable:
    table = titled_table(
        "the worst tokens by |Δ| = |log π_old − log μ| (seq:pos = sequence and position in "
        "its completion)",
        "#",
        "seq:pos",
        "π_old",
        "μ",
        "ρ",
    )
    table.add_column("token in context", justify="left")
    for i, t in enumerate(m.worst, 1):
        table.add_row(
            str(i),
            f"{t.sequence}:{t.position}",
            fmt(t.old_prob, 3),
            fmt(t.rollout_prob, 3),
            fmt(t.rho, 3),
            _short(t.context),
        )
    return table


def corrections_table(m: MismatchReport) -> FitTable:
    """Each worst token's weight under each correction: w, →w truncated, ✗ masked."""
    table = titled_table(
        "what each correction does to them: its weight w (→ truncated, ✗ masked)",
        "#",
        *(escape(c) for c in m.corrections),
    )
    for i, t in enumerate(m.worst, 1):
        cells = [
            "✗" if e.action == "masked" else f"{ACTION_MARK[e.action]}{fmt(e.weight, 3)}"
            for e in t.corrections
        ]
        table.add_row(str(i), *cells)
    return table


def mismatch_parts(report: CompareReport) -> Group | None:
    m = report.mismatch
    if m is None or m.statistics.count == 0:
        return None
    parts = [
        statistics_table(m),
        buckets_table("the gap by π_old(y)", "π_old", m.by_probability),
        buckets_table("the gap by position in the completion", "position", m.by_position),
    ]
    if m.worst:
        parts.append(worst_table(m))
        if m.corrections:
            parts.append(corrections_table(m))
    return Group(*parts)


def around_one(x: float | None) -> str:
    """A statistic whose ideal is 1 (a ratio, an ESS, a correlation): within 1e-3 of 1 it is
    written as 1 ± its distance, so 0.999983 never prints as a plain 1 at 4 digits."""
    if x is None or x == 1.0 or abs(x - 1.0) >= 1e-3:
        return fmt(x)
    return f"1 {'−' if x < 1.0 else '+'} {abs(1.0 - x):.2g}"
