"""The sweep for people: a summary table per loss and sign of A, findings, and the check.

Each row of a 1-D sweep carries a sparkline of |∂L/∂z_y| across the swept range on a log
scale shared by all rows ('·' where the gradient is exactly zero): a terminal plot for when a
PNG is not wanted.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.text import Text

from gradlens.report.fit import FitTable
from gradlens.report.sparkline import ZERO, log_range, sparkline
from gradlens.report.sweep_labels import (
    RULE_TEXT,
    axes_text,
    num,
    rule_text,
    runs_text,
    setting_text,
)
from gradlens.sweep.curves import Curve
from gradlens.sweep.results import CurveSummary, SweepReport, ZeroRun
from gradlens.sweep.run import SweepOutcome

SPARK_WIDTH = 36


def _sign(advantage: float) -> str:
    return "+" if advantage > 0 else "−"


def _where(report: SweepReport, s: CurveSummary) -> str:
    values = {"pi_old": s.max_at_pi_old, "pi_theta": s.max_at_pi_theta}
    return ", ".join(f"{a.symbol} = {num(values[a.name])}" for a in report.axes)


def _max_cell(report: SweepReport, s: CurveSummary) -> str:
    if s.max_grad is None:
        return "—"
    if s.min_grad is not None and s.max_grad == s.min_grad:
        return f"{num(s.max_grad)} (flat)"
    return f"{num(s.max_grad)} at {_where(report, s)}"


def _amp_cell(s: CurveSummary, threshold: float) -> str:
    if s.max_amplification is None:
        return "n/a"
    text = f"{num(s.max_amplification)}×"
    return f"[bold red]{text}[/]" if s.max_amplification > threshold else text


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _zero_cell(symbol: str, runs: list[ZeroRun] | None) -> str:
    if not runs:
        return "nowhere"
    return "; ".join(f"{runs_text(symbol, [r])} ({r.cause})" for r in runs)


def summary_table(outcome: SweepOutcome) -> FitTable:
    report = outcome.report
    one_d = len(report.axes) == 1
    symbol = report.axes[0].symbol
    threshold = report.amplified_above
    with_variants = report.variants != ["default"]
    table = FitTable(
        f"sampled-row logit gradient |∂L/∂z_y| — {axes_text(report)}",
        keys=3 if with_variants else 2,
        caption=f"loss settings: {setting_text(report)}",
    )
    table.add_column("loss", justify="left")
    rows = _rows(outcome)
    header, short = variant_column([v for _, _, v in rows])
    if with_variants:
        table.add_column(header, justify="left")
    table.add_column("A", justify="center")
    if one_d:
        a = report.axes[0]
        table.add_column(
            f"|∂L/∂z_y| over {symbol}: {a.min:g} → {a.max:g}", justify="left", no_wrap=True
        )
    table.add_column("max |∂L/∂z_y|", justify="left")
    table.add_column("max ×\nREINFORCE")
    if one_d:
        table.add_column(f"> {threshold:g}× REINFORCE", justify="left")
        table.add_column("= 0 (why)", justify="left")
    else:
        table.add_column(f"> {threshold:g}× REINFORCE\n(share of grid)")
        table.add_column("= 0\n(share of grid)")
        table.add_column("switched off\nby a rule")

    magnitudes = [c.grad_sampled.abs().tolist() for _, c, _ in rows] if one_d else []
    bounds = log_range(magnitudes)
    for k, (s, _, variant) in enumerate(rows):
        first = k == 0 or rows[k - 1][0].loss != s.loss
        cells = [s.loss if first else ""]
        if with_variants:
            cells.append(short[variant])
        cells.append(_sign(s.advantage))
        if one_d:
            cells.append(sparkline(magnitudes[k], SPARK_WIDTH, bounds))
        cells += [_max_cell(report, s), _amp_cell(s, threshold)]
        if one_d:
            amplified = "n/a" if s.amplified is None else runs_text(symbol, s.amplified)
            cells += [amplified, _zero_cell(symbol, s.zero)]
        else:
            cells += [_share(s.amplified_share), _share(s.zero_share)]
            cells.append(_share(s.switched_off_share))
        last_of_loss = k + 1 == len(rows) or rows[k + 1][0].loss != s.loss
        table.add_row(*cells, end_section=last_of_loss and k + 1 < len(rows))
    return table


def variant_column(labels: list[str]) -> tuple[str, dict[str, str]]:
    """The variant column's header and each label's cell: when every label sets the same keys
    in the same order (``k1=v1, k2=v2``, `gradlens.sweep.config.expand_over`), the keys go to
    the header once and the cells keep only the values, so the column is as narrow as they."""
    named = [v for v in dict.fromkeys(labels) if v != "(every variant)"]
    split = [[part.partition("=") for part in v.split(", ")] for v in named]
    keys = {tuple(k for k, eq, _ in parts if eq) for parts in split}
    if not named or len(keys) != 1 or any(not eq for parts in split for _, eq, _ in parts):
        return "variant", {v: v for v in labels}
    pairs = zip(named, split, strict=True)
    cells = {v: ", ".join(val for _, _, val in parts) for v, parts in pairs}
    cells["(every variant)"] = "(every variant)"
    return ", ".join(next(iter(keys))), cells


def _rows(outcome: SweepOutcome) -> list[tuple[CurveSummary, Curve, str]]:
    """(summary, curve, variant label) per row; a loss whose variants all agree gets one set."""
    report = outcome.report
    pairs = list(zip(report.summaries, outcome.curves, strict=True))
    out: list[tuple[CurveSummary, Curve, str]] = []
    for loss in dict.fromkeys(s.loss for s in report.summaries):
        mine = [(s, c) for s, c in pairs if s.loss == loss]
        first = [(s, c) for s, c in mine if s.variant == mine[0][0].variant]
        keys = {s.model_dump_json(exclude={"variant", "check_max_rel_err"}) for s, _ in mine}
        if len(report.variants) > 1 and len(keys) == len(first):
            out.extend((s, c, "(every variant)") for s, c in first)
        else:
            out.extend((s, c, s.variant) for s, c in mine)
    return out


def _findings(report: SweepReport, s: CurveSummary) -> list[str]:
    """What to notice about one curve, in words (the sign of A is added by the caller)."""
    one_d = len(report.axes) == 1
    symbol = report.axes[0].symbol
    threshold = report.amplified_above
    info = {info.name: info for info in report.losses}[s.loss]
    rules, words = info.rules, info.rule_words
    out = []
    amp = s.max_amplification
    if amp is not None and amp > threshold:
        line = (
            f"explodes: up to {num(amp)}× REINFORCE (|∂L/∂z_y| = {num(s.max_grad)} at "
            f"{_where(report, s)})"
        )
        if s.amplified is not None:
            line += f"; above {threshold:g}× for {runs_text(symbol, s.amplified)}"
        off = [r for r in rules if r not in s.rules_enabled]
        if rules:
            line += "; no rule of it fires there"
            if off:
                line += " (not enabled: " + "; ".join(f"{r}: {rule_text(r, words)}" for r in off)
                line += ")"
        out.append(line)
    if s.damped and s.min_amplification is not None:
        out.append(
            f"fades: below 1/{threshold:g} of REINFORCE for {runs_text(symbol, s.damped)}, "
            f"down to {num(s.min_amplification)}× — the token barely counts"
        )
    switched = [r for r in s.zero or [] if all(part in s.rules for part in r.cause.split("+"))]
    if switched:
        parts = [f"{runs_text(symbol, [r])} by {r.cause}" for r in switched]
        out.append("switched off (∂L/∂z_y = 0) for " + "; ".join(parts))
    elif not one_d and s.switched_off_share > 0:
        out.append(
            f"switched off (∂L/∂z_y = 0) on {s.switched_off_share:.1%} of the grid by "
            + ", ".join(s.rules)
        )
    return out


def findings(report: SweepReport) -> Text:
    """One line per thing to notice, merged across the signs of A and variants it holds for."""
    grouped: dict[tuple[str, str], list[CurveSummary]] = {}
    for s in report.summaries:
        for line in _findings(report, s):
            grouped.setdefault((s.loss, line), []).append(s)
    text = Text()
    for (loss, line), where in grouped.items():
        variants = list(dict.fromkeys(s.variant for s in where))
        if len(variants) == len(report.variants):
            heads = {loss: where}
        else:
            heads = {f"{loss} [{v}]": [s for s in where if s.variant == v] for v in variants}
        for name, group in heads.items():
            positive = {s.advantage > 0 for s in group}  # the signs it holds for
            sizes = {abs(s.advantage) for s in group}  # several with --over advantage=...
            if len(positive) > 1:
                sign = f"A = ±{sizes.pop():g}" if len(sizes) == 1 else "A of either sign"
            else:
                sign = f"A {'>' if positive.pop() else '<'} 0"
            text.append(f"• {name}, {sign}: ", style="bold")
            text.append(line + "\n")
    words = {info.name: info.rule_words for info in report.losses}
    meanings: dict[str, dict[str, list[str]]] = {}  # rule → its words → the losses using them
    for s in report.summaries:
        for r in s.rules:
            if r in RULE_TEXT or r in words[s.loss]:
                losses = meanings.setdefault(r, {}).setdefault(rule_text(r, words[s.loss]), [])
                if s.loss not in losses:
                    losses.append(s.loss)
    if meanings:
        entries = []
        for r in sorted(meanings):
            several = len(meanings[r]) > 1
            for meaning, losses in meanings[r].items():
                own = any(r in words[name] for name in losses)  # a loss's own words
                who = f" ({', '.join(losses)})" if several or own else ""
                entries.append(f"{r}{who}: {meaning}")
        text.append(f"rules: {'; '.join(entries)}\n", style="dim")
    if len(report.axes) == 1:
        text.append(
            f"curve: |∂L/∂z_y| on a log scale shared by all rows, {report.axes[0].symbol} "
            f"increasing to the right; '{ZERO}' = exactly 0\n",
            style="dim",
        )
    return text


def check_text(report: SweepReport) -> Text:
    c = report.check
    if c.curves == 0:
        return Text("closed form vs autograd: not run (check.points = 0)", style="yellow")
    symbol = report.axes[0].symbol
    xs = ", ".join(num(x, 2) for x in c.checked_x)
    status = Text("ok", style="bold green") if c.passed else Text("FAIL", style="bold red")
    line = Text(
        f"closed form vs autograd (float64, explicit V = {c.vocab_size} distribution) at "
        f"{c.points} points per curve ({symbol} ∈ {{{xs}}}), {c.curves} curves: max relative "
        f"error {num(c.max_rel_err, 2)} (tolerance {c.tolerance:g}) "
    )
    line.append_text(status)
    if not c.passed and c.worst:
        line.append(f" — worst: {c.worst}", style="red")
    return line


def render_sweep(outcome: SweepOutcome, console: Console) -> None:
    """Print the summary table, the findings and the autograd check."""
    report = outcome.report
    console.print(Group(summary_table(outcome), findings(report), check_text(report)))
