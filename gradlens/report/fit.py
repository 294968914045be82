"""Tables that fit the console's width without splitting a number or cutting a word.

A `FitTable` is filled like a rich ``Table`` (columns, rows of markup cells, sections) and lays
itself out when it is printed, at the width the console gives it. Its first ``keys`` columns
name the rows (a label, a loss and the sign of A, ...); the others hold values.

Every column needs at least its longest word — a number is one word — and a table of n columns
of content widths w_c takes Σ_c w_c + 3·(n − 1) + 2 characters (n + 1 borders, and a space of
padding either side of each inner border; the outer edges are not padded). When the value
columns do not all fit beside the key columns, they are dealt, in order, into as few
consecutive parts as fit (as even in count as fits), stacked, each with the key columns again
and numbered "(i/n)" after the title. The title and the caption are lines of their own, wrapped
at the console's width. Within a part every column starts at its natural width (its longest
line) and the widest value column is narrowed one character at a time, never below its
longest word, until the part fits — the key columns only once the values are at their
narrowest; cells then wrap between words only. Only key columns and one value column that
are together wider than the console still fold — the one case with no layout that fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.table import Table
from rich.text import Text

BORDER = 2  # the two outer borders
PER_EXTRA_COLUMN = 3  # one inner border and a space of padding either side of it


@dataclass
class FitColumn:
    header: str
    justify: JustifyMethod = "right"
    no_wrap: bool = False  # a column that must stay on one line (a sparkline)


@dataclass
class FitRow:
    cells: list[str]
    end_section: bool = False


def _extent(markup: str) -> tuple[int, int]:
    """(longest word, longest line) of a markup cell, in terminal cells."""
    plain = Text.from_markup(markup).plain
    lines = plain.splitlines() or [""]
    words = plain.split() or [""]
    return max(cell_len(w) for w in words), max(cell_len(line) for line in lines)


def table_width(widths: Sequence[int]) -> int:
    """Characters a table with these column content widths takes, borders and padding in."""
    return sum(widths) + PER_EXTRA_COLUMN * (len(widths) - 1) + BORDER


def narrow(minimum: Sequence[int], natural: Sequence[int], width: int, keys: int = 0) -> list[int]:
    """Column widths from ``natural``, narrowed one character at a time until the table fits
    ``width`` (or every column is at its minimum): the widest value column first, the ``keys``
    leading columns (the row labels, read first) only once every value column is at its
    ``minimum``, which no column goes below."""
    widths = list(natural)
    excess = table_width(widths) - width
    for first in (keys, 0):
        while excess > 0:
            movable = [i for i in range(first, len(widths)) if widths[i] > minimum[i]]
            if not movable:
                break
            widest = max(movable, key=lambda i: widths[i])
            widths[widest] -= 1
            excess -= 1
    return widths


def even_chunks(items: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


@dataclass
class FitTable:
    """A table that splits its value columns into stacked parts when they do not fit."""

    title: str
    keys: int = 1
    caption: str | None = None
    columns: list[FitColumn] = field(default_factory=list)
    rows: list[FitRow] = field(default_factory=list)

    def add_column(
        self, header: str, justify: JustifyMethod = "right", no_wrap: bool = False
    ) -> None:
        self.columns.append(FitColumn(header, justify, no_wrap))

    def add_row(self, *cells: str, end_section: bool = False) -> None:
        self.rows.append(FitRow(list(cells), end_section))

    def add_section(self) -> None:
        if self.rows:
            self.rows[-1].end_section = True

    def _extents(self) -> tuple[list[int], list[int]]:
        """(minimum, natural) content width of every column, its header included."""
        minimum, natural = [], []
        for i, column in enumerate(self.columns):
            extents = [_extent(column.header)] + [_extent(r.cells[i]) for r in self.rows]
            longest_line = max(line for _, line in extents)
            natural.append(longest_line)
            minimum.append(longest_line if column.no_wrap else max(w for w, _ in extents))
        return minimum, natural

    def parts(self, width: int) -> list[list[int]]:
        """The columns of each stacked part (key columns first) at ``width``."""
        minimum, _ = self._extents()
        keys = list(range(min(self.keys, len(self.columns))))
        values = list(range(len(keys), len(self.columns)))
        if not values:
            return [keys]

        def fits(chunk: list[int]) -> bool:
            return table_width([minimum[i] for i in keys + chunk]) <= width

        greedy: list[list[int]] = [[]]
        for v in values:
            if greedy[-1] and not fits([*greedy[-1], v]):
                greedy.append([])
            greedy[-1].append(v)
        even = even_chunks(values, len(greedy))
        chosen = even if all(fits(c) for c in even) else greedy
        return [keys + chunk for chunk in chosen]

    def tables(self, width: int) -> list[Table]:
        """The rich tables to print at ``width``: one, or the stacked parts (untitled)."""
        minimum, natural = self._extents()
        out = []
        for part in self.parts(width):
            table = Table(pad_edge=False)
            keys = min(self.keys, len(part))
            widths = narrow([minimum[i] for i in part], [natural[i] for i in part], width, keys)
            for i, w in zip(part, widths, strict=True):
                c = self.columns[i]
                table.add_column(
                    c.header, justify=c.justify, width=w, no_wrap=c.no_wrap, overflow="fold"
                )
            for row in self.rows:
                table.add_row(*(row.cells[i] for i in part), end_section=row.end_section)
            out.append(table)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The title, each part (numbered when there are several), and the caption; the title
        and caption wrap at the console's width, not the table's."""
        tables = self.tables(options.max_width)
        for k, table in enumerate(tables):
            title = self.title if len(tables) == 1 else f"{self.title} ({k + 1}/{len(tables)})"
            yield Text.from_markup(title, style="table.title")
            yield table
        if self.caption:
            yield Text.from_markup(self.caption, style="table.caption")
