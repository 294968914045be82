"""Rich tables for ``--split``: the framework's per-token weights and ‖∂L/∂W‖ under the split
against the full batch (`gradlens.results.split`)."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.text import Text

from gradlens.report.cells import fmt, ok, titled_table
from gradlens.results import CompareReport, SplitReport


def split_title(s: SplitReport) -> str:
    return (
        f"split micro={s.micro}, dp={s.dp}, ga={s.ga} as {escape(s.framework)} "
        f"{escape(s.versions)} computes {escape(s.setting)} ({s.aggregation}, normaliser per "
        f"{'micro-batch' if s.scope == 'micro' else 'step'}, loss {escape(s.loss_factor)})"
    )


def split_table(report: CompareReport) -> Group | None:
    s = report.split
    if s is None:
        return None
    micro = titled_table(
        split_title(s),
        "micro-batch",
        "rank",
        "step",
        "rows",
        "sequences",
        "tokens",
        "w_split / w_full min",
        "max",
    )
    for m in s.micro_batches:
        micro.add_row(
            str(m.index),
            str(m.rank),
            str(m.step),
            f"{m.rows[0]}–{m.rows[1] - 1}",
            str(m.sequences),
            str(m.tokens),
            fmt(m.weight_ratio_min),
            fmt(m.weight_ratio_max),
        )
    losses = titled_table(
        "lm_head gradient under the split (policy part)",
        "loss",
        "‖∂L/∂W‖ full",
        "‖∂L/∂W‖ split",
        "ratio",
        "‖ΔG‖/‖G_full‖",
        f"≤ {s.tolerance:.3g}",
    )
    for loss in s.losses:
        losses.add_row(
            escape(loss.name),
            fmt(loss.grad_norm_full),
            fmt(loss.grad_norm_split),
            fmt(loss.grad_norm_ratio),
            fmt(loss.grad_rel_diff, 3),
            ok(loss.passed),
        )
    words = Text(s.factor)
    for note in s.skipped:
        words.append(f"\nleft out: {note}")
    return Group(micro, losses, words)
