"""The table of ``gradlens losses``: every registered loss, its formula, g_t and source."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape

from gradlens.losses import LossSpec
from gradlens.report.cells import SEED_POST_NOTE
from gradlens.report.fit import FitTable


def loss_list_table(specs: Sequence[LossSpec]) -> FitTable:
    table = FitTable(
        "registered losses: ∂L/∂z_t = a_t·g_t·(e_y − π_t)", keys=1, caption=SEED_POST_NOTE
    )
    for header in (
        "name",
        "per-token loss (minimised)",
        "g_t = ∂ℓ/∂log π_θ(y)",
        "zero when",
        "source",
    ):
        table.add_column(header, justify="left")
    for s in specs:
        table.add_row(
            *(escape(x) for x in (s.name, s.formula, s.grad_formula, s.zero_when, s.paper))
        )
    return table
