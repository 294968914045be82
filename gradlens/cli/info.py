"""Reference commands: ``gradlens losses``, ``gradlens config``, ``gradlens schema``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gradlens.cli.common import (
    ConfigOption,
    DebugOption,
    OutputFormat,
    SetOption,
    set_option,
    stdout_console,
    stdout_errors,
    user_errors,
)
from gradlens.errors import GradlensError


def losses(
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table or json.")
    ] = OutputFormat.table,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Two losses A,B: their per-token gradients g_t side by side over a grid of "
            "r = π_θ/π_old (π_θ(y) = 0.09) for A = +1 and A = −1, and where they differ. Loss "
            "settings from --config and --set (e.g. --set loss.eps_high=0.28), which only "
            "--compare takes. The curves over "
            "π_old: `gradlens sweep --losses A,B`.",
            metavar="A,B",
        ),
    ] = None,
    config: ConfigOption = None,
    overrides: Annotated[
        list[str] | None,
        set_option("--compare ppo,ppo_clip --set loss.eps_high=0.4 (loss.* alone)"),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """List every registered loss with its formula, per-token gradient g_t and source; the
    aggregations with the frameworks (and versions) that use each; the framework losses. With
    --compare A,B: where the two losses' g_t differ as a function of (r, A)."""
    with user_errors(debug), stdout_errors():
        if compare is not None:
            _compare_pair(compare, output, config, overrides or [])
        elif config is not None or overrides:
            given = "--config" if config is not None else "--set"
            raise GradlensError(
                f"{given} gives the loss settings of --compare A,B; the list of losses takes "
                "none: add --compare A,B, or leave it out"
            )
        else:
            _print_losses(output)


def _print_losses(output: OutputFormat) -> None:
    import json

    from gradlens.losses import AGGREGATIONS, get_loss, loss_names
    from gradlens.losses.distill import DESCRIPTIONS
    from gradlens.losses.frameworks import framework_rows
    from gradlens.report.loss_list import (
        aggregation_table,
        distill_list_table,
        framework_table,
        loss_list_table,
    )

    specs = [get_loss(n) for n in loss_names()]
    aggregations = [
        {"name": name, "loss": mode.formula, "used_by": mode.used_by}
        for name, mode in AGGREGATIONS.items()
    ]
    frameworks = framework_rows()
    distill = [
        {"name": name, "divergence": formula, "grad_logits": grad, "paper": paper}
        for name, (formula, grad, paper) in DESCRIPTIONS.items()
    ]
    if output is OutputFormat.json:
        rows = [
            {
                "name": s.name,
                "formula": s.formula,
                "per_token_grad": s.grad_formula,
                "zero_when": s.zero_when,
                "paper": s.paper,
                "coupling": s.coupling,
                "needs": list(s.needs),
                "regions": list(s.regions),
            }
            for s in specs
        ]
        data = {
            "losses": rows,
            "aggregations": aggregations,
            "frameworks": frameworks,
            "distillation": distill,
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    table = loss_list_table(specs)
    agg_table = aggregation_table(aggregations)
    fw_table = framework_table(frameworks)
    distill_table = distill_list_table(distill)
    console = stdout_console()
    console.print(table)
    console.print(agg_table)
    console.print(fw_table)
    console.print(distill_table)
    console.print(
        "with every loss: loss.entropy_coef (entropy bonus), loss.distill (a teacher), "
        "loss.corrections (token_tis, "
        "seq_tis, token_mis, seq_mis, icepop, geo_mask, seq_mask_tis; verl's rejection options "
        "token_k1 … seq_max_k3, chainable; AReaL's areal_<level>_<metric>[_clamp]; renormalize: "
        "true for the masking kinds, batch_normalize: true for the weighting ones), "
        "loss.bypass_mode (verl's bypass mode), loss.top_entropy_quantile (train the "
        "top-entropy tokens only); your own loss: --losses module:function or "
        "verl:module:function (docs/cli.md)"
    )
    console.print(
        "coupling: what decides a token's g_t besides its own inputs — its sequence, its prompt "
        "group or the whole batch (docs/losses.md §2)"
    )


def _compare_pair(pair: str, output: OutputFormat, path: Path | None, overrides: list[str]) -> None:
    """``gradlens losses --compare A,B``: compute with `gradlens.sweep.pair`, render here."""
    import dataclasses
    import json

    from gradlens.config import build_config
    from gradlens.report.loss_list import pair_table
    from gradlens.sweep.pair import compare_pair

    names = [n.strip() for n in pair.split(",") if n.strip()]
    if len(names) != 2:
        raise GradlensError(f"--compare takes two losses A,B, got {pair!r}")
    for text in overrides:
        if not text.strip().startswith("loss."):
            raise GradlensError(
                f"--set {text!r}: --compare A,B reads the loss settings (loss.*) alone; "
                "anything else would have no effect"
            )
    cfg = build_config(path, overrides)
    result = compare_pair(names[0], names[1], cfg.loss.params(), cfg.loss.token_aggregation())
    if output is OutputFormat.json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
        return
    a, b = result.loss_a, result.loss_b
    table = pair_table(result)
    console = stdout_console()
    console.print(table)
    for sign, words in ((1.0, "A > 0"), (-1.0, "A < 0")):
        where = result.differing(sign)
        listed = ", ".join(f"{r:g}" for r in where) if where else "nowhere on this grid"
        console.print(f"{words}: {a} and {b} differ at r = {listed}")


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
