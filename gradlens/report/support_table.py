"""Rich table for the rollout's top-p/top-k kept sets and what replaying them changes."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.text import Text

from gradlens.report.cells import fmt, pct, titled_table
from gradlens.results import CompareReport, SupportReport


def support_sentence(s: SupportReport) -> str:
    """The clip fractions in one sentence: "without replay, X% of tokens would be clipped
    instead of Y%" (the sampler ratio when the batch has one, else the policy ratio)."""
    ratio = s.ratios[-1] if s.ratios else None
    if ratio is None or ratio.clipfrac_full is None or ratio.clipfrac_kept is None:
        return ""
    return (
        f"without replay, {pct(ratio.clipfrac_full)} of tokens would be clipped on "
        f"{ratio.formula_full} instead of {pct(ratio.clipfrac_kept)} on {ratio.formula_kept}"
    )


def support_table(report: CompareReport) -> Group | None:
    s = report.support
    if s is None:
        return None
    mode = "replayed: the losses use π̃" if s.replayed else "not replayed (sampling_support: full)"
    head = titled_table(
        f"sampling support ({escape(s.rule)}; {mode}), S_t = π_θ's mass of K_t",
        "tokens",
        "|K_t| mean / min / max",
        "S_t mean / min / p05 / p50",
        "mean log S_t",
        "S_t of π_old / μ",
    )
    head.add_row(
        str(s.tokens),
        f"{fmt(s.kept_mean, 3)} / {fmt(s.kept_min)} / {fmt(s.kept_max)}",
        " / ".join(fmt(v) for v in (s.mass_mean, s.mass_min, s.mass_p05, s.mass_p50)),
        fmt(s.log_mass_mean),
        f"{fmt(s.old_mass_mean)} / {fmt(s.rollout_mass_mean)}",
    )
    ratios = titled_table(
        "the ratios on the whole vocabulary and on the kept sets",
        "ratio",
        "mean (whole vocabulary)",
        "mean (replayed)",
        "clipped",
        "clipped (replayed)",
    )
    for r in s.ratios:
        ratios.add_row(
            f"{escape(r.formula_full)} → {escape(r.formula_kept)}",
            fmt(r.mean_full),
            fmt(r.mean_kept),
            pct(r.clipfrac_full),
            pct(r.clipfrac_kept),
        )
    lowest = titled_table(
        "the smallest S_t", "sequence", "position", "token", "|K_t|", "S_t", "log S_t", keys=0
    )
    for t in s.lowest[:5]:
        lowest.add_row(
            str(t.sequence),
            str(t.position),
            str(t.token),
            str(t.kept),
            fmt(t.mass),
            fmt(t.log_mass),
        )
    return Group(head, ratios, lowest, Text(support_sentence(s)))
