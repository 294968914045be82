"""The sweep's records as JSON, JSON Lines or CSV: one flat record per (loss, variant, A, point);
and its summary as one JSON document.

Every format has the same columns in the same order (`SweepOutcome.columns`): the
`SweepPoint` fields, with one column per ``over`` key after ``variant``. All values are
scalars, so each format loads into a table as it is:

    pandas.read_json(f)              # json: an array of objects
    pandas.read_json(f, lines=True)  # jsonl: one object per line
    pandas.read_csv(f)               # csv: a header row, then one row per record

Missing numbers (a non-finite value, an unchecked point's error, an amplification that does
not apply) are JSON null and an empty CSV field (NaN in pandas). Booleans are JSON true/false
and CSV True/False, which pandas reads back as booleans. Text columns never hold an empty
string — ``variant`` is 'default' and ``rule`` is 'none' when there is nothing to say — so a
pandas ``groupby`` on them never drops rows.

The summary (``--format summary``) is the `SweepReport` itself, schema ``gradlens.sweep/2``,
indented like ``gradlens compare --format json``, non-finite numbers null.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from typing import IO, Any

from gradlens.report.serialize import to_json
from gradlens.sweep.results import SweepReport

FORMATS = ("json", "jsonl", "csv")

Tick = Callable[[int], None]  # called with the number of rows written since the last call
TICK_EVERY = 10_000


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, allow_nan=False)


def write_records(
    rows: Iterable[dict[str, Any]],
    header: list[str],
    fmt: str,
    stream: IO[str],
    tick: Tick | None = None,
) -> int:
    """Write ``rows`` to ``stream`` as ``fmt``; returns the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}")
    count = 0
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=header, lineterminator="\n")
        writer.writeheader()
    elif fmt == "json":
        stream.write("[")
    for row in rows:
        if writer is not None:
            writer.writerow(row)
        elif fmt == "json":
            stream.write(("\n  " if count == 0 else ",\n  ") + _dumps(row))
        else:
            stream.write(_dumps(row) + "\n")
        count += 1
        if tick is not None and count % TICK_EVERY == 0:
            tick(TICK_EVERY)
    if fmt == "json":
        stream.write("\n]\n" if count else "]\n")
    if tick is not None:
        tick(count % TICK_EVERY)
    return count


def write_summary(report: SweepReport, stream: IO[str]) -> None:
    """Write ``report`` to ``stream`` as one indented JSON document (schema gradlens.sweep/2)."""
    stream.write(to_json(report) + "\n")
