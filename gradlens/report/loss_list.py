"""The tables of ``gradlens losses``: every registered loss (its formula, g_t and source), the
aggregations with the framework versions that use each, and the framework losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.markup import escape

from gradlens.losses import LossSpec
from gradlens.report.cells import SEED_POST_NOTE
from gradlens.report.fit import FitTable
from gradlens.sweep.pair import PairTable


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
        "coupling",
    ):
        table.add_column(header, justify="left")
    for s in specs:
        needs = f" (needs {', '.join(s.needs)})" if s.needs else ""
        cells = (s.name, s.formula, s.grad_formula, s.zero_when, s.paper, s.coupling + needs)
        table.add_row(*(escape(x) for x in cells))
    return table


def aggregation_table(rows: Sequence[Mapping[str, str]]) -> FitTable:
    """One row per aggregation: ``name``, ``loss`` (its formula), ``used_by``."""
    table = FitTable(
        "aggregations (loss.aggregation; S = B', or B with loss.count_empty_sequences; "
        "L = loss.loss_scale_factor or the padded length)",
        keys=1,
    )
    for header in ("name", "loss", "used by (framework version)"):
        table.add_column(header, justify="left")
    for row in rows:
        table.add_row(*(escape(row[k]) for k in ("name", "loss", "used_by")))
    return table


def framework_table(rows: Sequence[Mapping[str, str]]) -> FitTable:
    """One row per framework: ``names``, ``supported``, ``tested``, ``installed``."""
    table = FitTable(
        "framework losses: the framework's own code, config from the loss section "
        "(docs/losses.md §9)",
        keys=0,  # the long list of names narrows first, so a version range stays on one line
    )
    for header in ("names", "supported", "tested", "installed"):
        table.add_column(header, justify="left")
    for row in rows:
        table.add_row(*(escape(row[k]) for k in ("names", "supported", "tested", "installed")))
    return table


def distill_list_table(rows: Sequence[Mapping[str, str]]) -> FitTable:
    """One row per distillation divergence: ``name``, ``divergence``, ``grad_logits``, ``paper``."""
    table = FitTable(
        "distillation terms (loss.distill.divergence; form full or top_k; not c-form: "
        "∂L/∂z_t = λ·a_t·(u_t − π_t·Σu_t), zero-sum; docs/losses.md §2.29)",
        keys=1,
    )
    for header in ("divergence", "D_t", "∂D_t/∂z_v (full form)", "source"):
        table.add_column(header, justify="left")
    for row in rows:
        table.add_row(*(escape(row[k]) for k in ("name", "divergence", "grad_logits", "paper")))
    return table


def pair_table(result: PairTable) -> FitTable:
    """``gradlens losses --compare A,B``: g_t of both losses over (A, r), and which rules fire."""
    a, b = result.loss_a, result.loss_b
    table = FitTable(
        f"g_t of {escape(a)} and {escape(b)} at π_θ(y) = {result.pi_theta:g}, π_old = π_θ/r "
        "(∂L/∂z = a·g·(e_y − π); a is the same for both on a lone token)",
        keys=2,
    )
    for header in ("A", "r", f"g {a}", f"g {b}", "differ", f"rules {a}", f"rules {b}"):
        table.add_column(escape(header), justify="right")
    table.columns[-1].justify = table.columns[-2].justify = "left"
    for row in result.rows:
        table.add_row(
            f"{row.advantage:+g}",
            f"{row.ratio:g}",
            f"{row.grad_a:.6g}",
            f"{row.grad_b:.6g}",
            "yes" if row.differ else "",
            escape(", ".join(row.rules_a)),
            escape(", ".join(row.rules_b)),
        )
    return table
