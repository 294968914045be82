"""``gradlens trace`` as text: the per-step table, the spikes with their contributors, CSV,
JSONL and JSON (the figure is `gradlens.report.trace_plot`)."""

from __future__ import annotations

import csv
import io
import json
import math

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.text import Text

from gradlens.report.cells import fmt, titled_table
from gradlens.report.fit import FitTable
from gradlens.results.trace import SpikeDetail, TraceReport


def step_records(trace: TraceReport) -> list[dict[str, object]]:
    """One flat record per step: step, the columns by label, spike, z, batch_file."""
    out = []
    for s in trace.steps:
        record: dict[str, object] = {"step": s.step}
        record.update({c.label: s.values.get(c.key) for c in trace.columns})
        record.update(spike=s.spike, z=s.z, batch_file=s.batch_file)
        out.append(record)
    return out


def trace_csv(trace: TraceReport) -> str:
    records = step_records(trace)
    buffer = io.StringIO()
    names = list(records[0]) if records else ["step"]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


def trace_jsonl(trace: TraceReport) -> str:
    """One JSON object per step; a value that is not finite is null, as in the JSON report
    (JSON has no NaN or Infinity)."""
    return "".join(
        json.dumps({k: _finite_or_none(v) for k, v in r.items()}, allow_nan=False) + "\n"
        for r in step_records(trace)
    )


def _finite_or_none(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def trace_json(trace: TraceReport) -> str:
    return trace.model_dump_json(indent=2)


def _spike_tables(spike: SpikeDetail) -> list[RenderableType]:
    if spike.value is None or spike.z is None:
        what = "is not finite (NaN or inf): the run diverged or the step overflowed"
    elif spike.median:
        what = (
            f"= {fmt(spike.value)}, {spike.value / spike.median:.3g}× the running median "
            f"{fmt(spike.median)} (robust z = {spike.z:.1f})"
        )
    else:
        what = f"= {fmt(spike.value)} (robust z = {spike.z:.1f})"
    head = Text(f"spike at step {spike.step}: {spike.series} {what}", style="bold red")
    parts: list[RenderableType] = [head]
    if spike.note:
        parts.append(Text(spike.note))
        return parts
    parts.append(
        Text(f"largest contributors of {spike.loss} in {spike.batch_file} (share of Σ‖∂L/∂z_t‖)")
    )
    seqs = titled_table("sequences", "sequence", "tokens", "advantage", "share", "response")
    for s in spike.sequences:
        text = "" if s.text is None else repr(s.text[:60])
        seqs.add_row(str(s.sequence), str(s.tokens), fmt(s.advantage), f"{s.share:.1%}", text)
    toks = titled_table(
        "tokens", "seq:pos", "token", "advantage", "ratio", "c_t", "‖∂L/∂z_t‖", "share"
    )
    for t in spike.tokens:
        token = str(t.token) if t.text is None else f"{t.token} {t.text!r}"
        toks.add_row(
            f"{t.sequence}:{t.position}",
            token,
            fmt(t.advantage),
            fmt(t.ratio),
            fmt(t.coefficient),
            fmt(t.grad_norm),
            f"{t.share:.1%}",
        )
    return [*parts, seqs, toks]


def trace_renderable(trace: TraceReport) -> RenderableType:
    table = FitTable(f"gradlens trace: {escape(trace.target)}", keys=1)
    table.add_column("step", justify="right")
    for col in trace.columns:
        table.add_column(escape(col.label), justify="right")
    table.add_column("spike", justify="left")
    for s in trace.steps:
        mark = (
            ""
            if not s.spike
            else f"[bold red]SPIKE z={s.z:.0f}[/]"
            if s.z is not None
            else "[bold red]SPIKE (not finite)[/]"
        )
        cells = [fmt(s.values.get(c.key)) for c in trace.columns]
        table.add_row(str(s.step), *cells, mark)
    parts: list[RenderableType] = [table]
    series = trace.series or "—"
    parts.append(
        Text(
            f"spikes in {series}: robust z = (x − running median)/(1.4826·MAD) over the "
            f"previous {trace.window} steps > {trace.threshold:g}; {len(trace.spikes)} found"
        )
    )
    for spike in trace.spikes:
        parts.extend(_spike_tables(spike))
    for bad in trace.bad_files:
        parts.append(Text(f"skipped {bad.name}: {bad.error}", style="yellow"))
    return Group(*parts)
