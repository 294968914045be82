"""The figure of ``gradlens trace --plot``: a run's series on one shared step axis.

One panel per group of columns (gradient norm, lm_head gradient norm, clip fraction, ratio
quantiles, KL, entropy, training–inference mismatch: those the run has), stacked, sharing the
step axis. Every spike is a red band across all panels, and in the spike series' panel a red
point with its value and how many times the running median it is; the running median itself
is drawn dashed. Matplotlib's object API, as `gradlens.report.plots`.
"""

from __future__ import annotations

from pathlib import Path

from gradlens.errors import GradlensError
from gradlens.files import writing
from gradlens.report.plots import DPI, check_plot_path
from gradlens.results.trace import TraceReport

LOG_GROUPS = {"gradient norm", "lm_head gradient norm"}


def plot_trace(trace: TraceReport, path: Path) -> None:
    """Draw ``trace`` to ``path`` (.png, .svg or .pdf)."""
    check_plot_path(path)
    from matplotlib.figure import Figure

    groups: dict[str, list[tuple[str, str]]] = {}
    for col in trace.columns:
        groups.setdefault(col.group, []).append((col.key, col.label))
    if not groups:
        raise GradlensError("--plot: the trace has no series to draw")
    steps = [s.step for s in trace.steps]
    fig = Figure(figsize=(10, 1.9 * len(groups) + 1.2), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    spikes = [s for s in trace.steps if s.spike]
    for ax, (group, cols) in zip(axes, groups.items(), strict=True):
        positive = True
        for key, label in cols:
            xs = [s.step for s in trace.steps if s.values.get(key) is not None]
            ys = [s.values[key] for s in trace.steps if s.values.get(key) is not None]
            positive = positive and all(y is not None and y > 0 for y in ys)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=label)
        if group in LOG_GROUPS and positive:
            ax.set_yscale("log")
        for spike in spikes:
            ax.axvspan(spike.step - 0.4, spike.step + 0.4, color="red", alpha=0.12, linewidth=0)
        if trace.series is not None and any(key == trace.series for key, _ in cols):
            xs = [s.step for s in trace.steps if s.median is not None]
            ax.plot(
                xs,
                [s.median for s in trace.steps if s.median is not None],
                linestyle="--",
                color="grey",
                linewidth=1,
                label="running median (earlier steps)",
            )
            for spike in spikes:
                value = spike.values.get(trace.series)
                if value is None or not spike.median:
                    continue
                ax.plot([spike.step], [value], "o", color="red", markersize=8, zorder=5)
                ax.annotate(
                    f"SPIKE step {spike.step}: {value:.3g} = {value / spike.median:.3g}× median",
                    (spike.step, value),
                    textcoords="offset points",
                    xytext=(-10, -14),
                    ha="right",
                    color="red",
                    fontsize=9,
                    fontweight="bold",
                )
        ax.set_ylabel(group, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("optimizer step")
    if steps:
        axes[-1].set_xticks(steps if len(steps) <= 30 else steps[:: max(1, len(steps) // 30)])
    title = f"gradlens trace of {trace.target}: {len(trace.steps)} steps"
    if spikes:
        title += ", spike at step " + ", ".join(str(s.step) for s in spikes) + " (red)"
    fig.suptitle(title, fontsize=11)
    with writing(path, "--plot", "wb") as fh:  # missing folders made, as every plot's are
        fig.savefig(fh, dpi=DPI, format=path.suffix.lower()[1:])
