"""The figure of the ``mismatch`` section (compare ``--plot-mismatch``, docs/mismatch.md).

Left: a 2-D histogram of the tokens over log10 π_old(y_t) (x) and log ρ_t = log π_old − log μ
(y), counts on a log colour scale, with each token-level correction's bounds drawn as
horizontal lines (TIS and MIS caps, IcePop's band, verl's token_k3 roots, the [0.9, 1.1] band:
gradlens.diagnostics.mismatch_histogram) and the worst tokens marked. Right: mean |Δ| per π_old
bucket (bars) and each bucket's share of the k3 KL (points, second axis). Drawn through
matplotlib's object API like every figure of gradlens.report.plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradlens.errors import GradlensError
from gradlens.files import writing
from gradlens.report.plots import COLORS, DPI, check_plot_path
from gradlens.results import CompareReport, MismatchReport

LINE_STYLES = ("--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 3)))


def mismatch_figure(report: CompareReport) -> Any:
    """The matplotlib ``Figure`` of ``report.mismatch``."""
    m = report.mismatch
    if m is None or m.histogram is None:
        raise GradlensError(
            "--plot-mismatch draws the training–inference gap, and this batch has no rollout "
            "log-probs (rollout_logp): set source.rollout_drift (synthetic source), or use the "
            "model source or a batch file that carries them"
        )
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.6, 1))
    h = m.histogram
    counts = [[c if c > 0 else math.nan for c in row] for row in h.counts]
    top = max(max(row) for row in h.counts)
    mesh = left.pcolormesh(
        h.x_edges, h.y_edges, counts, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(top, 2))
    )
    fig.colorbar(mesh, ax=left, label="tokens")
    _lines(left, m, h.y_edges[0], h.y_edges[-1])
    worst_x = [math.log10(max(t.old_prob, 1e-300)) for t in m.worst]
    worst_y = [t.log_diff for t in m.worst]
    left.scatter(
        [max(x, h.x_edges[0]) for x in worst_x],
        worst_y,
        s=28,
        facecolors="none",
        edgecolors="red",
        label=f"the {len(m.worst)} worst tokens",
    )
    left.set_xlim(h.x_edges[0], h.x_edges[-1])
    left.set_ylim(h.y_edges[0], h.y_edges[-1])
    left.set_xlabel("log10 π_old(y): the sampled token's probability in the training pass")
    left.set_ylabel("log ρ = log π_old(y) − log μ(y)")
    s = m.statistics
    left.set_title(
        f"{s.count} tokens: k3 {s.k3_kl:.3g}, χ²_token {s.chi2_token:.3g}, "
        f"{(s.outside_band or 0.0):.1%} outside [{s.band_low:g}, {s.band_high:g}]"
        if s.k3_kl is not None and s.chi2_token is not None
        else f"{s.count} tokens",
        fontsize=10,
    )
    left.legend(fontsize=7, loc="lower left", ncol=2)
    _buckets(right, m)
    fig.suptitle(
        f"training–inference gap: π_old (training pass) against μ (rollout pass) "
        f"({report.batch.source.split(';')[0]})",
        fontsize=11,
    )
    return fig


def _lines(ax: Any, m: MismatchReport, low: float, high: float) -> None:
    """Each threshold line inside the axis, one style per correction."""
    styles: dict[str, Any] = {}
    outside: dict[str, list[float]] = {}
    for line in m.thresholds:
        style = styles.setdefault(line.correction, LINE_STYLES[len(styles) % len(LINE_STYLES)])
        color = COLORS[(list(styles).index(line.correction) + 1) % len(COLORS)]
        if not low <= line.log_rho <= high:
            outside.setdefault(line.correction, []).append(line.log_rho)
            continue
        seen = any(a.get_label() == line.correction for a in ax.get_lines())
        ax.axhline(
            line.log_rho,
            color=color,
            linestyle=style,
            linewidth=1.1,
            label="_" if seen else line.correction,
        )
    ax.axhline(0.0, color="black", linewidth=0.5)
    if outside:  # the bounds beyond the gap: say where they are rather than squash the data
        words = "; ".join(
            f"{name} at log ρ {', '.join(f'{v:.3g}' for v in values)}"
            for name, values in outside.items()
        )
        ax.text(
            0.01,
            0.99,
            f"beyond every token (not drawn): {words}",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7,
            wrap=True,
        )


def _buckets(ax: Any, m: MismatchReport) -> None:
    labels = [b.label for b in m.by_probability]
    means = [b.abs_diff_mean or 0.0 for b in m.by_probability]
    x = list(range(len(labels)))
    ax.bar(x, means, color=COLORS[0], alpha=0.8, label="mean |Δ|")
    for xi, b in zip(x, m.by_probability, strict=True):
        ax.text(xi, means[xi], f"{b.count}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, fontsize=8)
    ax.set_xlabel("π_old(y) bucket (the number above each bar: its tokens)")
    ax.set_ylabel("mean |Δ| (nats)")
    share = ax.twinx()
    share.plot(x, [b.k3_share or 0.0 for b in m.by_probability], "o-", color=COLORS[1])
    share.set_ylabel("share of the k3 KL", color=COLORS[1])
    share.set_ylim(0.0, 1.0)
    ax.set_title("where the gap lives: by π_old", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)


def plot_mismatch(report: CompareReport, path: Path) -> None:
    """Draw ``report``'s mismatch figure to ``path`` (.png, .svg or .pdf)."""
    check_plot_path(path, "--plot-mismatch")
    fig = mismatch_figure(report)
    with writing(path, "--plot-mismatch", "wb") as fh:
        fig.savefig(fh, dpi=DPI, format=path.suffix.lower()[1:])
