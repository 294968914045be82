"""Table cells every renderer shares: number formats, pass/fail marks, titled tables, and the
cells of a loss's extra metrics and rule shares."""

from __future__ import annotations

from rich.markup import escape

from gradlens.report.fit import FitTable
from gradlens.results import LossReport

# The blog post gradlens grew from, and where the documentation summarises it: every table that
# quotes "the seed post" carries this note.
SEED_POST = "docs/losses.md#the-seed-post"
SEED_POST_NOTE = (
    "seed post: the blog post on what REINFORCE, PPO and SFT do to the lm_head that gradlens "
    f"grew from, summarised in {SEED_POST}"
)


def fmt(x: float | int | None, digits: int = 4) -> str:
    """4 significant digits; '—' for a missing (undefined or non-finite) value."""
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x + 0.0:.{digits}g}"  # + 0.0 turns −0.0 into 0.0


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2%}"


def ok(passed: bool) -> str:
    return "[green]ok[/]" if passed else "[bold red]FAIL[/]"


def titled_table(title: str, *columns: str, keys: int = 1) -> FitTable:
    """A table fitted to the console's width; its first ``keys`` columns (left-justified) name
    the rows and are repeated when the others are stacked in parts (`gradlens.report.fit`)."""
    table = FitTable(title, keys=keys)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < keys else "right")
    return table


# Clip and mask shares that the fixed rows of the losses table already show.
SHOWN = {"clip_upper", "clip_lower", "clip_dual", "seq_masked"}


def metrics_cell(r: LossReport) -> str:
    """A loss's extra metrics, ``name value`` pairs, or '—'."""
    if not r.metrics:
        return "—"
    return escape(", ".join(f"{k} {fmt(v)}" for k, v in r.metrics.items()))


def agreement_cell(r: LossReport) -> str:
    """ok / FAIL, with the sample's size when the check was sampled; 'not run' without one."""
    a = r.agreement
    if not a.ran:
        return "not run"
    if a.scope == "sampled":
        return f"{ok(a.passed)} (sampled: {a.sampled_tokens} tokens, {a.sampled_rows} rows)"
    return ok(a.passed)


def other_rules_cell(r: LossReport) -> str:
    """Shares of the regions the fixed clipping rows do not show (CISPO, corrections, ...)."""
    shares = {k: v for k, v in r.clipping.shares.items() if k not in SHOWN}
    if not shares:
        return "—"
    cells = []
    for name, share in shares.items():
        seq = r.clipping.sequence_shares.get(name)
        cells.append(f"{name} {pct(share)}" + (f" ({pct(seq)} of seqs)" if seq is not None else ""))
    return escape(", ".join(cells))
