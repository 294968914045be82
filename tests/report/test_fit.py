"""The layout arithmetic of `gradlens.report.fit`, worked by hand."""

from __future__ import annotations

import io

from rich.cells import cell_len
from rich.console import Console

from gradlens.report.fit import FitTable, even_chunks, narrow, table_width


def test_table_width_counts_borders_and_inner_padding():
    # n columns: n + 1 borders and 2 spaces at each of the n − 1 inner borders
    assert table_width([5]) == 5 + 2  # 7
    assert table_width([5, 5]) == 10 + 3 * 1 + 2  # 15
    assert table_width([5, 5, 5]) == 15 + 3 * 2 + 2  # 23


def test_table_width_is_what_rich_draws():
    table = FitTable("t", keys=1)
    for header in ("a", "b", "c"):
        table.add_column(header)
    table.add_row("12345", "12345", "12345")
    console = Console(width=200, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    lines = console.export_text().splitlines()[1:]  # below the title
    assert {cell_len(line) for line in lines} == {table_width([5, 5, 5])}


def test_narrow_takes_the_widest_column_first_and_stops_at_the_fit():
    # natural [10, 4] takes 14 + 3 + 2 = 19 > 12: 7 characters to give up. Column 0 is the
    # wider one until it reaches 4 (6 characters); then the tie goes to the first column: [3, 4]
    assert narrow([2, 3], [10, 4], 12) == [3, 4]
    assert table_width([3, 4]) == 12


def test_narrow_keeps_the_row_labels_until_the_values_are_at_their_narrowest():
    # natural [10, 8, 6] takes 24 + 6 + 2 = 32 > 25: 7 to give up. The values (columns 1, 2)
    # go first, widest first: 8 → 6 (2), then both down to their minimum 4 (2 + 2) = 6 given
    # up; the seventh character comes from the labels: [9, 4, 4]
    assert narrow([3, 4, 4], [10, 8, 6], 25, keys=1) == [9, 4, 4]
    assert table_width([9, 4, 4]) == 25


def test_narrow_never_goes_below_the_longest_word():
    # [5, 5] takes 15 > 10, but neither column may lose a character
    assert narrow([5, 5], [6, 6], 10) == [5, 5]


def test_even_chunks_differ_by_at_most_one():
    assert even_chunks([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert even_chunks([1, 2, 3, 4], 3) == [[1, 2], [3], [4]]


def _four_values() -> FitTable:
    table = FitTable("four values", keys=1)
    for header in ("k", "v1", "v2", "v3", "v4"):
        table.add_column(header)
    table.add_row("k", *["123456789"] * 4)
    return table


def test_parts_are_as_few_as_fit_and_as_even_as_fits():
    # minimum widths [1, 9, 9, 9, 9]. All five: 37 + 12 + 2 = 51 > 40. Greedily, the key and
    # three values take 28 + 9 + 2 = 39 ≤ 40 and the fourth value starts a second part; two
    # parts of two values take 19 + 6 + 2 = 27 each, so the even split is chosen
    table = _four_values()
    assert table.parts(51) == [[0, 1, 2, 3, 4]]
    assert table.parts(40) == [[0, 1, 2], [0, 3, 4]]
    # at 26 one key and two values (27) no longer fit: one value per part
    assert table.parts(26) == [[0, 1], [0, 2], [0, 3], [0, 4]]


def test_parts_are_stacked_and_numbered():
    console = Console(width=40, record=True, file=io.StringIO(), color_system=None)
    console.print(_four_values())
    text = console.export_text()
    assert "four values (1/2)" in text and "four values (2/2)" in text
    assert text.count("123456789") == 4
    assert max(cell_len(line) for line in text.splitlines()) <= 40
