"""Reference commands: ``gradlens losses``, ``gradlens config``, ``gradlens schema``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from gradlens.cli.common import (
    ConfigOption,
    DebugOption,
    OutputFormat,
    SetOption,
    stdout_console,
    user_errors,
)


def losses(
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """List every registered loss with its formula, per-token gradient g_t and source."""
    import json

    from gradlens.losses import AGGREGATIONS, get_loss, loss_names
    from gradlens.report.loss_list import loss_list_table

    specs = [get_loss(n) for n in loss_names()]
    if output is OutputFormat.json:
        rows = [
            {
                "name": s.name,
                "formula": s.formula,
                "per_token_grad": s.grad_formula,
                "zero_when": s.zero_when,
                "paper": s.paper,
            }
            for s in specs
        ]
        typer.echo(
            json.dumps(
                {"losses": rows, "aggregations": list(AGGREGATIONS)}, indent=2, ensure_ascii=False
            )
        )
        return
    table = loss_list_table(specs)
    console = stdout_console()
    console.print(table)
    console.print(f"aggregations (loss.aggregation): {', '.join(AGGREGATIONS)}")
    console.print(
        "with every loss: loss.entropy_coef (entropy bonus), loss.corrections (token_tis, "
        "seq_tis, token_mis, seq_mis, icepop, geo_mask); your own loss: --losses "
        "module:function or verl:module:function (docs/cli.md)"
    )


def config(
    config: ConfigOption = None,
    overrides: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Print the resolved configuration as YAML (defaults < file < --set)."""
    with user_errors(debug):
        from gradlens.config import build_config, to_yaml

        typer.echo(to_yaml(build_config(config, overrides or [])), nl=False)


class SchemaReport(str, Enum):
    compare = "compare"
    sweep = "sweep"


def schema(
    report: Annotated[
        SchemaReport,
        typer.Option(
            "--report",
            "-r",
            help="compare: `gradlens compare --format json` (gradlens.compare/2). sweep: "
            "`gradlens sweep --format summary` (gradlens.sweep/2).",
        ),
    ] = SchemaReport.compare,
) -> None:
    """Print the JSON Schema of a JSON report: compare's (the default) or sweep's summary."""
    from gradlens.report.serialize import json_schema

    typer.echo(json_schema(report.value))
