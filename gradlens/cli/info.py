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
    stdout_errors,
    user_errors,
)


def losses(
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """List every registered loss with its formula, per-token gradient g_t and source; the
    aggregations with the frameworks (and versions) that use each; the framework losses."""
    with user_errors(debug=False), stdout_errors():
        _print_losses(output)


def _print_losses(output: OutputFormat) -> None:
    import json

    from gradlens.losses import AGGREGATIONS, get_loss, loss_names
    from gradlens.losses.frameworks import framework_rows
    from gradlens.report.loss_list import aggregation_table, framework_table, loss_list_table

    specs = [get_loss(n) for n in loss_names()]
    aggregations = [
        {"name": name, "loss": mode.formula, "used_by": mode.used_by}
        for name, mode in AGGREGATIONS.items()
    ]
    frameworks = framework_rows()
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
        data = {"losses": rows, "aggregations": aggregations, "frameworks": frameworks}
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    table = loss_list_table(specs)
    agg_table = aggregation_table(aggregations)
    fw_table = framework_table(frameworks)
    console = stdout_console()
    console.print(table)
    console.print(agg_table)
    console.print(fw_table)
    console.print(
        "with every loss: loss.entropy_coef (entropy bonus), loss.corrections (token_tis, "
        "seq_tis, token_mis, seq_mis, icepop, geo_mask; renormalize: true for the masking "
        "kinds); your own loss: --losses module:function or verl:module:function (docs/cli.md)"
    )


def config(
    config: ConfigOption = None,
    overrides: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Print the resolved configuration as YAML (defaults < file < --set)."""
    with user_errors(debug):
        from gradlens.config import build_config, to_yaml

        text = to_yaml(build_config(config, overrides or []))
        with stdout_errors():
            typer.echo(text, nl=False)


class SchemaReport(str, Enum):
    compare = "compare"
    sweep = "sweep"


def schema(
    report: Annotated[
        SchemaReport,
        typer.Option(
            "--report",
            "-r",
            help="compare: `gradlens compare --format json` (gradlens.compare/3). sweep: "
            "`gradlens sweep --format summary` (gradlens.sweep/2).",
        ),
    ] = SchemaReport.compare,
) -> None:
    """Print the JSON Schema of a JSON report: compare's (the default) or sweep's summary."""
    from gradlens.report.serialize import json_schema

    with user_errors(debug=False), stdout_errors():
        typer.echo(json_schema(report.value))
