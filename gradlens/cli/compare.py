"""``gradlens compare``: run several losses on one batch and show them side by side."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from gradlens.cli.common import (
    EXIT_CHECK_FAILED,
    ConfigOption,
    DebugOption,
    OutputFormat,
    SetOption,
    output_file,
    stdout_console,
    stdout_errors,
    user_errors,
)
from gradlens.errors import GradlensError
from gradlens.files import check_distinct

HELP = (
    "Run each loss on the same batch; report what it does to the logits and the lm_head.\n\n"
    "For every loss: the sampled-row vs other-row logit gradient against the seed post's "
    "closed form, per-row lm_head gradient norms, the zero-sum check, clip fractions, and the "
    "agreement of the closed form with autograd. Shared by all losses: ratio statistics and KL "
    "estimates. Exit status: 0 ok, 1 an invariant failed under --check, 2 bad input.\n\n"
    "The seed post: the blog post on what REINFORCE, PPO and SFT do to the lm_head that "
    "gradlens grew from, summarised in docs/losses.md#the-seed-post."
)


def compare(
    losses: Annotated[
        str | None,
        typer.Option(
            "--losses",
            "-l",
            help="Comma-separated loss names (see `gradlens losses`), e.g. reinforce,ppo,sft. "
            "Default: the config's `losses` (reinforce,ppo,ppo_clip,sft).",
        ),
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            metavar="synthetic|literal|model|batch",
            help="Where the batch comes from (sets source.kind). model: the built-in tiny "
            "causal LM, or a local Hugging Face checkpoint with --set source.path=DIR.",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            "-d",
            metavar="cpu|cuda|auto",
            help="Where to compute. cuda without a GPU is an error; auto falls back to cpu.",
        ),
    ] = None,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            "-f",
            help="table: rich tables for people. json: the full report (schema "
            "gradlens.compare/3, see `gradlens schema`) with the resolved config and environment.",
        ),
    ] = OutputFormat.table,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit with status 1 if an invariant fails: a token in the loss, a gradient "
            "the batch does not make identically zero, zero-sum of the logit and lm_head "
            "gradients, closed form vs autograd, finite gradients, log-probs ≤ 0.",
        ),
    ] = False,
    parity: Annotated[
        list[str] | None,
        typer.Option(
            "--parity",
            metavar="A,B",
            help="Compare two losses (built-in, module:function, a framework's own loss such "
            "as verl:vanilla, trl:grpo, openrlhf:ppo, or verl:module:function) on the same "
            "batch: max |Δc_t| and where, the ‖∂L/∂W‖ ratio, clip fractions side by side, and "
            "why they differ. Give it once per pair. --check fails beyond parity.tolerance "
            "(default: the dtype's agreement tolerance). Without --losses, runs just the "
            "pairs' losses.",
        ),
    ] = None,
    parity_matrix: Annotated[
        list[str] | None,
        typer.Option(
            "--parity-matrix",
            metavar="KEY=[V1, V2]",
            help="Run the --parity pairs under every combination of these settings (a dotted "
            "key and a YAML list of values, once per key), in one process: each framework is "
            "imported once. Prints one line per setting and pair.",
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            metavar="auto|materialized|streamed|fused",
            help="How the lm_head gradients are computed. materialized: [tokens, vocab] "
            "gradients in memory; streamed: two passes over vocabulary chunks sharing one "
            "softmax, nothing of size tokens×vocab or vocab×hidden kept (large batches); "
            "fused: the streamed passes with Triton kernels (CUDA; opt-in until measured); "
            "auto (default): streamed above diagnostics.stream_above (2^24) tokens×vocab. "
            "Sets diagnostics.engine.",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            metavar="auto|autograd|sampled|none",
            help="Check the gradients against torch.autograd: autograd materialises [tokens, "
            "vocab] per loss; sampled checks c_t of every token, a sample of tokens' logit "
            "gradients and a sample of lm_head rows. auto (default): autograd with the "
            "materialized engine, sampled with the streamed ones. Sets diagnostics.reference.",
        ),
    ] = None,
    tensor_parallel: Annotated[
        int | None,
        typer.Option(
            "--tensor-parallel",
            metavar="N",
            help="Split the lm_head's vocabulary rows over N ranks, one process each, launched "
            "by torchrun: `torchrun --nproc-per-node N -m gradlens compare --tensor-parallel N "
            "…` (gloo on CPU, NCCL on CUDA). The streamed engine, the same report as one "
            "process; rank 0 prints it. Sets diagnostics.tensor_parallel (default 1).",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            metavar="micro=N,dp=N,ga=N",
            help="Recompute each loss's gradient as a framework does when the batch is cut "
            "into micro-batches of N sequences over dp data-parallel ranks and ga accumulation "
            "steps (micro·dp·ga = the batch's sequences), and compare it with the full-batch "
            "gradient: per-token weight ratios, the ‖∂L/∂W‖ ratio, the factor in words. "
            "--check fails when the gradient depends on the split beyond rounding. Needs "
            "--convention. Sets split.micro, split.dp, split.ga (docs/split.md).",
        ),
    ] = None,
    convention: Annotated[
        str | None,
        typer.Option(
            "--convention",
            metavar="verl|verl_legacy|trl|openrlhf|ms_swift[:SETTING]",
            help="Whose split --split reproduces: the framework's table (versions in "
            "docs/split.md); FRAMEWORK:SETTING names the setting (trl:bnpo, trl:dapo), else "
            "loss.aggregation picks it. Sets split.convention. With --plot, several "
            "comma-separated (trl:bnpo,verl) are drawn side by side; the report is the first's.",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            parser=output_file,
            help="Also draw the attribution to FILE (.png, .svg or .pdf; needs matplotlib, the "
            "`plot` extra): per loss, each token's share of the lm_head update against π_θ(y) "
            "by sign of A, and the shares by group (docs/attribution.md). Turns "
            "diagnostics.attribution auto on, whatever the engine (off: refused). With --split, "
            "the split instead: each sequence's w_split/w_full coloured by micro-batch, with the "
            "sequence lengths, one panel per --convention (docs/split.md).",
        ),
    ] = None,
    plot_mismatch: Annotated[
        Path | None,
        typer.Option(
            "--plot-mismatch",
            metavar="FILE",
            parser=output_file,
            help="Also draw the training–inference gap to FILE (.png, .svg or .pdf; needs "
            "matplotlib): log ρ against log π_old as a 2-D histogram with the corrections' "
            "thresholds, and mean |Δ| by π_old bucket (docs/mismatch.md). Needs rollout "
            "log-probs.",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Run each loss on the same batch; report what it does to the logits and the lm_head."""
    with user_errors(debug):
        from gradlens.cli.distributed import launched

        launch = launched()
    with user_errors(debug, launch.rank, launch.world):
        from gradlens.cli.distributed import process_group
        from gradlens.cli.progress import progress_bar
        from gradlens.compare import run_compare
        from gradlens.compare.matrix import run_parity_matrix
        from gradlens.config import build_config, parse_split, settings_grid
        from gradlens.progress import reporting
        from gradlens.report.parity_table import render_parity_matrix
        from gradlens.report.serialize import to_json
        from gradlens.report.table import render_compare
        from gradlens.results import CompareReport, ParityMatrixReport

        names = None if losses is None else [n.strip() for n in losses.split(",") if n.strip()]
        flags: dict[str, Any] = {
            "losses": names,
            "device": device,
            "source.kind": source,
            "diagnostics.engine": engine,
            "diagnostics.reference": reference,
            "diagnostics.tensor_parallel": tensor_parallel,
        }
        pairs = []
        for text in parity or []:
            pair = [n.strip() for n in text.split(",") if n.strip()]
            if len(pair) != 2:
                raise GradlensError(f"--parity {text!r}: name exactly two losses, A,B")
            if pair[0] == pair[1]:
                raise GradlensError(f"--parity {text!r}: a loss against itself; name two losses")
            if pair in pairs:
                raise GradlensError(f"--parity {text!r}: this pair is given twice")
            pairs.append(pair)
        if pairs:
            flags["parity.pairs"] = pairs
            if names is None:
                flags["losses"] = list(dict.fromkeys(n for pair in pairs for n in pair))
        if split is not None:
            flags.update(parse_split(split))
        conventions = [c.strip() for c in (convention or "").split(",") if c.strip()]
        if conventions:
            flags["split.convention"] = conventions[0]
        grid = settings_grid(parity_matrix or [])
        cfg = build_config(config, overrides or [], flags)
        if len(conventions) > 1 and (plot is None or cfg.split is None):
            raise GradlensError(
                f"--convention {convention!r} names {len(conventions)} conventions: several "
                "are drawn side by side by --split … --plot FILE; give one otherwise"
            )
        # the other conventions' configs, validated before any work; each is one more run
        others = [
            build_config(config, overrides or [], {**flags, "split.convention": name})
            for name in conventions[1:]
        ]
        check_distinct({"--plot": plot, "--plot-mismatch": plot_mismatch})
        if plot_mismatch is not None and launch.speaks:  # before any work
            from gradlens.report.plots import check_plot_path

            check_plot_path(plot_mismatch, "--plot-mismatch")
            if grid:
                raise GradlensError(
                    "--plot-mismatch draws the gap of one report; --parity-matrix makes one "
                    "per setting: drop one of them"
                )
        if plot is not None and launch.speaks:  # before any work
            from gradlens.report.plots import check_plot_path

            check_plot_path(plot)
            if grid:
                raise GradlensError(
                    "--plot draws the attribution of one report; --parity-matrix makes one per "
                    "setting: drop one of them"
                )
            d = cfg.diagnostics
            if cfg.split is None and (
                d.attribution == "off" or (d.attribution == "auto" and d.engine == "fused")
            ):
                raise GradlensError(
                    f"--plot draws the attribution, and diagnostics.attribution is "
                    f"{d.attribution!r} with engine {d.engine!r}: set diagnostics.attribution on "
                    "(with the materialized or streamed engine) or auto"
                )
        d = cfg.diagnostics
        if plot is not None and not grid and cfg.split is None and d.attribution == "auto":
            # the plot draws the attribution: on with whatever engine auto picks (the streamed
            # one pays about one more GEMM-equivalent per loss for it), on every rank alike;
            # auto with the fused engine was refused above
            diagnostics = d.model_copy(update={"attribution": "on"})
            cfg = cfg.model_copy(update={"diagnostics": diagnostics})
        with process_group(cfg, launch):
            bar = progress_bar() if launch.speaks else nullcontext(None)
            with bar as callback, reporting(callback):
                if grid:
                    runs = [
                        (s, build_config(config, [*(overrides or []), *_as_overrides(s)], flags))
                        for s in grid
                    ]
                    report: CompareReport | ParityMatrixReport = run_parity_matrix(cfg, runs)
                else:
                    report = run_compare(cfg)
        if launch.speaks:  # rank 0 writes the report; every rank exits with the same status
            if plot is not None:  # first: a plot that fails leaves no half-written report
                assert isinstance(report, CompareReport)  # no --parity-matrix (checked above)
                from gradlens.cli.common import stderr_console
                from gradlens.report.plots import plot_attribution, plot_split

                if report.split is not None:  # --split: the split figure, one panel each
                    splits = [report.split] + [run_compare(other).split for other in others]
                    plot_split([x for x in splits if x is not None], plot)
                else:
                    plot_attribution(report, plot)
                stderr_console().print(f"wrote the plot to {plot}")
            if plot_mismatch is not None:
                assert isinstance(report, CompareReport)  # no --parity-matrix (checked above)
                from gradlens.cli.common import stderr_console
                from gradlens.report.mismatch_plot import plot_mismatch as draw_mismatch

                draw_mismatch(report, plot_mismatch)
                stderr_console().print(f"wrote the mismatch plot to {plot_mismatch}")
            with stdout_errors():
                if output is OutputFormat.json:
                    typer.echo(to_json(report))
                elif isinstance(report, ParityMatrixReport):
                    render_parity_matrix(report, stdout_console())
                else:
                    render_compare(report, stdout_console())
    if check and not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _as_overrides(settings: dict[str, Any]) -> list[str]:
    """A matrix entry as ``--set`` overrides (JSON is YAML, so null, lists and numbers keep)."""
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]
