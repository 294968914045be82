"""Figures of a sweep and of compare's attribution (the trace's figure is trace_plot.py;
matplotlib is imported nowhere else).

The figure is drawn through matplotlib's object API (`matplotlib.figure.Figure`, saved by the
Agg renderer): no pyplot, no global state, no display, whatever MPLBACKEND says. matplotlib
stays optional (the ``plot`` extra): without it ``--plot`` is a clear error, not a traceback.

1-D sweep: one panel per sign of A, x = the swept probability (log scale unless the sweep is
linear), y = |∂L/∂z_y| on a log scale, one line per loss (and per ``over`` variant where the
variants differ), the x-ranges where a rule switches a loss off shaded in that loss's colour
and labelled with the rule, the on-policy point r = 1 marked, r on a second x axis, and the
largest amplification over REINFORCE annotated. Losses often coincide (SFT and REINFORCE at
|A| = 1, PPO and its clip wherever the clip is off), so every curve stays visible by itself:
each later series is drawn narrower on top of the earlier ones, and each carries
filled markers of its own shape, above every line, at x positions staggered between the
series and never on top of one another (the curve drawn over the shortest stretch chooses
first, so a loss the clip mostly switches off keeps its markers).

2-D grid: a heat map of |∂L/∂z_y| per loss (columns) and sign of A (rows) over π_old (x) and
π_θ (y), with a shared log colour scale, exact zeros in grey, the diagonal r = 1, and the
contour where the gradient reaches 10× REINFORCE's.

Attribution (compare ``--plot``): one row per loss that has an attribution section; left, each
token's share ⟨g_t h_tᵀ, G⟩/‖G‖² of the lm_head update against π_θ(y) (log x, symmetric-log y:
shares are signed), coloured by the sign of its advantage with each colour's summed share in the
legend; right, the group shares (sign of A, loss term, clip/mask region, π_θ(y) bucket, quarter
of the completion) as horizontal bars, each group summing to 100%.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.errors import GradlensError
from gradlens.files import check_output, writing
from gradlens.report.sweep_labels import (
    rule_name,
    rule_text,
    setting_text,
    sign_text,
    support_parts,
)
from gradlens.results import CompareReport, LossReport, SplitReport
from gradlens.sweep.curves import SIGNS, Curve
from gradlens.sweep.grid import Axis
from gradlens.sweep.run import SweepOutcome
from gradlens.sweep.summary import runs

FORMATS = (".png", ".svg", ".pdf")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#7f7f7f", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
ZERO_GREY = "#d0d0d0"
DPI = 110  # 14-inch figures → about 1,500 px wide: every label readable, files ~200 kB
# The y axis (heat maps: the colour scale) reaches at most this factor below the largest
# gradient: smaller ones are drawn at the bottom edge. A weight that underflows (VESPO's φ
# reaches 1e-321) would otherwise stretch the axis over hundreds of decades.
DECADES_SHOWN = 1e-14

AXIS_WORDS = {
    "pi_old": "π_old(y): the sampled token's probability under the policy that generated it",
    "pi_theta": "π_θ(y): the sampled token's probability under the policy being trained",
}
SIGN_WORDS = {1.0: "a rewarded token", -1.0: "a penalised token"}


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise GradlensError(
            "--plot needs matplotlib, which is not installed: pip install 'gradlens[plot]' "
            "(or pip install 'matplotlib>=3.8')"
        ) from None
    return matplotlib


def check_plot_path(path: Path, option: str = "--plot") -> None:
    """Fail early, before any work, on a file type we cannot write, a path that cannot be
    written (`gradlens.files.check_output`) or a missing matplotlib; errors name ``option``."""
    check_output(path, option)
    if path.suffix.lower() not in FORMATS:
        raise GradlensError(
            f"{option} {str(path)!r}: the file name must end in {', '.join(FORMATS)}"
        )
    _matplotlib()


def sweep_figure(outcome: SweepOutcome) -> Any:
    """The matplotlib ``Figure`` of ``outcome``: heat maps for a 2-D grid, else line panels."""
    _matplotlib()
    return _heat_maps(outcome) if outcome.grid.is_2d else _lines(outcome)


def plot_sweep(outcome: SweepOutcome, path: Path) -> None:
    """Draw ``outcome`` to ``path`` (.png, .svg or .pdf)."""
    check_plot_path(path)
    fig = sweep_figure(outcome)
    with writing(path, "--plot", "wb") as fh:
        fig.savefig(fh, dpi=DPI, format=path.suffix.lower()[1:])


# ----------------------------------------------------------------------------- helpers


def _edges(axis: Axis) -> Tensor:
    """[n + 1] cell edges around the points: geometric midpoints on a log axis."""
    v = axis.values
    t = torch.log(v) if axis.scale == "log" else v
    mid = (t[1:] + t[:-1]) / 2
    first, last = 2 * t[0] - mid[0], 2 * t[-1] - mid[-1]
    e = torch.cat([first[None], mid, last[None]])
    return torch.exp(e) if axis.scale == "log" else e


def _distinct(curves: list[Curve]) -> list[tuple[Curve, str]]:
    """The curves to draw, labelled; a loss whose variants all coincide is drawn once.

    Variants are merged per loss only when they coincide for every sign of A, so a series
    has the same label in every panel.
    """
    by_loss: dict[str, dict[str, list[Curve]]] = {}
    for c in curves:
        by_loss.setdefault(c.loss, {}).setdefault(c.variant.label, []).append(c)
    out: list[tuple[Curve, str]] = []
    for loss, variants in by_loss.items():
        groups = list(variants.values())
        first = groups[0]
        same = all(
            all(torch.equal(a.grad_sampled, b.grad_sampled) for a, b in zip(g, first, strict=True))
            for g in groups[1:]
        )
        if same:
            out.extend((c, loss) for c in first)
        else:
            out.extend((c, f"{loss} [{c.variant.label}]") for g in groups for c in g)
    return out


def _fmt_big(x: float) -> str:
    """1234 → '1.2·10³' and 0.00002 → '2·10⁻⁵' in mathtext; numbers near 1 as they are."""
    if x == 0 or 1e-3 <= abs(x) < 1e3:
        return f"{x:.3g}"
    exponent = math.floor(math.log10(x))
    mantissa = round(x / 10**exponent, 1)
    if mantissa >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    head = "" if mantissa == 1 else f"{mantissa:g}·"
    return f"{head}10$^{{{exponent}}}$"


# ----------------------------------------------------------------------------- 1-D

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]
MARKER_SIZE = 10  # points: about 15 px at DPI, well clear of every line's width
MARKERS_PER_SERIES = 6  # across the panel, staggered between the series
MARKER_GAP = 0.025  # axes widths between two markers' centres: about 16 px, no overlap
PANEL_ASPECT = 0.67  # a panel's height over its width, to measure that gap on screen

LABEL_TOPS = (0.97, 0.88, 0.78, 0.69, 0.59, 0.50, 0.40, 0.31, 0.21)  # box tops, axes fraction
LABEL_SHIFTS = (0.0, 0.15, -0.15)  # candidate shifts of a label off its span's middle
LABEL_SIZE = (0.24, 0.17)  # rough width and height of a three-line label, axes fraction
LINE_HEIGHT = 0.045  # one line of 9.5-point text, axes fraction (rough)
CHAR_WIDTH = 0.012  # one character of 9.5-point text, axes fraction (rough)

Box = tuple[float, float, float, float]  # x0, x1, y0, y1 in axes fraction
Trace = tuple[Tensor, Tensor]  # x and y of a drawn line, axes fraction


def _lines(outcome: SweepOutcome) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    report, grid = outcome.report, outcome.grid
    axis = grid.x
    x = axis.values
    infos = {info.name: info for info in report.losses}
    series = _distinct(outcome.curves)
    labels = list(dict.fromkeys(label for _, label in series))
    colors = {label: COLORS[i % len(COLORS)] for i, label in enumerate(labels)}
    # Earlier series are drawn wider and underneath, later ones narrower on top: where two
    # losses coincide both colours show, and the markers tell them apart.
    widths = {label: max(6.0 - 1.4 * i, 2.2) for i, label in enumerate(labels)}
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}

    fig = Figure(figsize=(14, 6.8), layout="constrained")
    panels = fig.subplots(1, len(SIGNS), sharey=True)
    magnitudes = torch.cat([c.grad_sampled.abs() for c in outcome.curves])
    positive = magnitudes[magnitudes > 0]
    high = float(positive.max()) if positive.numel() else 1.0
    low = max(float(positive.min()), high * DECADES_SHOWN) if positive.numel() else 0.1
    y_low, y_high = low / 4, high * 40
    x_frac = torch.tensor([_fraction(axis, v) for v in x.tolist()], dtype=torch.float64)

    def y_frac(y: Tensor) -> Tensor:
        return (torch.log(y) - math.log(y_low)) / (math.log(y_high) - math.log(y_low))

    other_name = "pi_theta" if axis.name == "pi_old" else "pi_old"
    other = grid.fixed[other_name]
    reference = report.amplified_above * report.advantage * outcome.curves[0].weight
    reference_y = reference * (1.0 - grid.pi_theta)  # 10× REINFORCE's |∂L/∂z_y|
    reference_y = torch.where(reference_y > 0, reference_y, float("nan"))

    handles: dict[str, Any] = {}
    for ax, sign in zip(panels, SIGNS, strict=True):
        drawn = [(c, label) for c, label in series if c.advantage * sign > 0]
        ax.set_xscale("log" if axis.scale == "log" else "linear")
        ax.set_yscale("log")
        ax.set_xlim(float(x[0]), float(x[-1]))
        ax.set_ylim(y_low, y_high)
        ax.grid(True, which="major", alpha=0.3)

        if float(x[0]) <= other <= float(x[-1]):  # r = 1: every PPO variant equals REINFORCE
            ax.axvline(other, color="black", lw=1, ls=(0, (4, 3)), alpha=0.6, zorder=2)
            ax.text(
                other,
                0.16,
                "r = 1 (on-policy) ",
                rotation=90,
                va="bottom",
                ha="right",
                fontsize=9,
                transform=ax.get_xaxis_transform(),
                alpha=0.8,
            )
        ax.plot(x.tolist(), reference_y.tolist(), color="black", lw=0.9, ls=":", alpha=0.7)
        ax.text(
            float(x[0]),
            float(reference_y[0]) * 1.15,
            f"  {report.amplified_above:g}× REINFORCE's gradient",
            fontsize=8.5,
            alpha=0.8,
            va="bottom",
        )

        traces: list[Trace] = []  # the curves; a label may cover the dotted 10× guide
        ys = {label: curve.grad_sampled.abs() for curve, label in drawn}
        ys = {label: torch.where(y > 0, y, float("nan")) for label, y in ys.items()}
        # Markers are placed for the curve drawn over the shortest stretch first, and none
        # where it would cover another's: a loss the clip mostly switches off stays visible.
        taken: list[tuple[float, float]] = []
        spots: dict[str, list[int]] = {}
        for label in sorted(ys, key=lambda lb: int(torch.isfinite(ys[lb]).sum())):
            k = labels.index(label)
            spots[label] = _marker_points(x_frac, y_frac(ys[label]), k, len(labels), taken)
        for curve, label in drawn:
            y = ys[label]
            k = labels.index(label)
            style: dict[str, Any] = {
                "color": colors[label],
                "lw": widths[label],
                "marker": markers[label],
                "ms": MARKER_SIZE,
                "mec": "white",
                "mew": 0.8,
            }
            ax.plot(
                x.tolist(),
                y.tolist(),
                **{**style, "marker": None},
                solid_capstyle="butt",
                zorder=3 + k * 0.01,
                gid=f"series {label}",
            )
            ax.plot(
                [float(x[i]) for i in spots[label]],
                [float(y[i]) for i in spots[label]],
                **{**style, "ls": "none"},
                zorder=4.5 + k * 0.01,  # above every line
                gid=f"markers {label}",
            )
            key = f"{label}:  |∂L/∂z_y| = {infos[curve.loss].post_formula}"
            handles.setdefault(key, Line2D([], [], **style))
            traces.append((x_frac, y_frac(y)))

        guide = float(y_frac(reference_y[:1] * 1.15))  # the 10× guide's own label, left
        placed: list[Box] = [(0.0, CHAR_WIDTH * 26, guide, guide + LINE_HEIGHT)]
        placed += _annotate_peaks(ax, x_frac, y_frac, drawn, report.amplified_above)
        placed += _annotate_fading(ax, x, drawn, report.amplified_above)
        placed += _unclipped_notes(ax, x, drawn, infos, report.amplified_above)
        _shade(ax, axis, drawn, colors, traces, placed, infos)

        ax.set_title(f"{sign_text(sign * report.advantage)}: {SIGN_WORDS[sign]}", fontsize=12.5)
        ax.set_xlabel(AXIS_WORDS[axis.name] + (" (log scale)" if axis.scale == "log" else ""))
        _ratio_axis(ax, axis.name, other)
    panels[0].set_ylabel("|∂L/∂z_y|: gradient on the sampled token's logit (log scale)")

    fixed_symbol = "π_θ(y)" if other_name == "pi_theta" else "π_old(y)"
    fig.suptitle(
        f"How hard each loss pushes the sampled token's logit as {axis.symbol}(y) varies "
        f"({fixed_symbol} = {other:g}, |A| = {report.advantage:g})\n"
        f"{setting_text(report, support=False)}; a line stops where its gradient is exactly 0"
        + "".join(f"\n{part}" for part in [", ".join(support_parts(report))] if part),
        fontsize=13,
    )
    legend = fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside lower center",
        ncols=min(len(handles), 2),
        fontsize=10.5,
        frameon=False,
        title="r = π_θ(y)/π_old(y);  M = 0 where the loss's rule (clip or mask) fires, else 1;  "
        "a narrower line on a wider one: the two coincide (the markers tell them apart)",
        title_fontsize=9.5,
    )
    legend.get_title().set_alpha(0.8)
    return fig


def _fraction(axis: Axis, value: float) -> float:
    """Where ``value`` lies along the axis, 0 (left) … 1 (right), in the axis's own scale."""
    lo, hi = float(axis.values[0]), float(axis.values[-1])
    if axis.scale == "log":
        return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (value - lo) / (hi - lo)


def _marker_points(
    x_frac: Tensor, y_frac: Tensor, k: int, n: int, taken: list[tuple[float, float]]
) -> list[int]:
    """Indices of series ``k`` of ``n`` to mark, given the markers already ``taken`` (axes
    fractions; the new ones are added). About MARKERS_PER_SERIES across the panel and at least
    one on every stretch the line is drawn, each aimed at (j + (k + ½)/n) spacings along the
    stretch, so that coinciding series alternate; each goes to the point nearest its aim that
    is MARKER_GAP clear of every marker taken, or is left out if the stretch has none."""
    points: list[int] = []
    for first, last in runs(torch.isfinite(y_frac)):
        lo, hi = float(x_frac[first]), float(x_frac[last])
        count = max(1, round((hi - lo) * MARKERS_PER_SERIES))
        step = (hi - lo) / count
        stretch = torch.arange(first, last + 1)
        for j in range(count):
            aim = lo + (j + (k + 0.5) / n) * step
            for i in stretch[(x_frac[stretch] - aim).abs().argsort()].tolist():
                xi, yi = float(x_frac[i]), float(y_frac[i])
                if all(math.hypot(xi - a, (yi - b) * PANEL_ASPECT) >= MARKER_GAP for a, b in taken):
                    points.append(i)
                    taken.append((xi, yi))
                    break
    return sorted(points)


def _crowding(box: Box, traces: list[Trace], placed: list[Box]) -> float:
    """How many drawn points (and earlier labels, heavily) a label box would cover."""
    x0, x1, y0, y1 = box
    hits = 0.0
    for xf, yf in traces:
        inside = (xf >= x0) & (xf <= x1) & (yf >= y0) & (yf <= y1)
        hits += float(inside.sum())
    for a0, a1, b0, b1 in placed:
        if a0 < x1 and x0 < a1 and b0 < y1 and y0 < b1:
            hits += 1e6
    return hits


def _who(owners: list[tuple[Curve, str]], drawn: list[tuple[Curve, str]]) -> str:
    """Name the series ``owners``: the loss when they are all of its variants, else a list."""
    losses = {c.loss for c, _ in owners}
    if len(losses) == 1:
        loss = next(iter(losses))
        if len(owners) == sum(1 for c, _ in drawn if c.loss == loss):
            return loss
    names = ", ".join(label for _, label in owners)
    return names if len(names) <= 60 else f"{len(owners)} curves"


def _note(ax: Any, *args: Any, **kwargs: Any) -> None:
    """An annotation that does not push the axes around in the constrained layout."""
    ax.annotate(*args, **kwargs).set_in_layout(False)


def _shade(
    ax: Any,
    axis: Axis,
    drawn: list[tuple[Curve, str]],
    colors: dict[str, str],
    traces: list[Trace],
    placed: list[Box],
    infos: dict[str, Any],
) -> None:
    """Shade each x-range where a rule switched a loss off, once, with a label naming it.

    Identical ranges of several series (variants of a loss that clip alike) are drawn once.
    The label goes where it covers the fewest drawn points and other labels: over the middle
    of the span if it can, at the highest such place.
    """
    x, edges = axis.values, _edges(axis)
    spans: dict[tuple[int, int, tuple[str, ...]], list[tuple[Curve, str]]] = {}
    for curve, label in drawn:
        for first, last in runs(curve.fired & curve.zero):
            rules = tuple(curve.rules_at(first) or curve.rules_at(last))
            spans.setdefault((first, last, rules), []).append((curve, label))
    for (first, last, rules), owners in spans.items():
        lo = max(float(edges[first]), float(x[0]))
        hi = min(float(edges[last + 1]), float(x[-1]))
        color = colors[owners[0][1]]
        ax.axvspan(lo, hi, color=color, alpha=0.11, lw=0, zorder=1)
        own = infos[owners[0][0].loss].rule_words
        names = " / ".join(dict.fromkeys(rule_name(r) for r in rules))
        when = "\nor ".join(rule_text(r, own) for r in rules)
        label = (
            f"{_who(owners, drawn)}: no gradient here,\n{names} switches the token off\n({when})"
        )
        width = max(LABEL_SIZE[0], CHAR_WIDTH * max(len(line) for line in label.splitlines()))
        height = LINE_HEIGHT * (label.count("\n") + 1) + 0.03
        lo_f, hi_f = _fraction(axis, lo), _fraction(axis, hi)
        lefts: list[float] = []
        for shift in LABEL_SHIFTS:  # over the middle of the span first, then beside it
            x0 = (lo_f + hi_f) / 2 - width / 2 + shift
            if hi_f - lo_f >= width:  # a wide span: the label stays over it
                x0 = min(max(x0, lo_f), hi_f - width)
            x0 = min(max(x0, 0.0), 1.0 - width)  # and inside the panel
            if x0 not in lefts:
                lefts.append(x0)
        boxes = [(x0, x0 + width, top - height, top) for top in LABEL_TOPS for x0 in lefts]
        box = min(boxes, key=lambda b: _crowding(b, traces, placed))
        placed.append(box)
        text = ax.text(
            box[0],
            box[3],
            label,
            transform=ax.transAxes,
            ha="left",
            va="top",
            multialignment="center",
            fontsize=9.5,
            color=color,
            zorder=6,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": color, "alpha": 0.9},
        )
        text.set_in_layout(False)


def _annotate_peaks(
    ax: Any, x_frac: Tensor, y_frac: Any, drawn: list[tuple[Curve, str]], threshold: float
) -> list[Box]:
    """Mark the largest amplification over REINFORCE, naming every series that reaches it.

    Points are given in axes fraction (``x_frac``, ``y_frac``) so the box the text occupies
    is known to the label placement that follows.
    """
    peaks: dict[tuple[int, float], list[tuple[Curve, str]]] = {}
    for curve, label in drawn:
        amp = torch.nan_to_num(curve.amplification, nan=0.0)
        amp = torch.where(curve.zero, 0.0, amp)  # a zero gradient has no place on a log axis
        k = int(amp.argmax())
        if float(amp[k]) > threshold:
            peaks.setdefault((k, float(amp[k])), []).append((curve, label))
    boxes = []
    for (k, value), owners in peaks.items():
        curve = owners[0][0]
        xk, yk = float(x_frac[k]), float(y_frac(curve.grad_sampled[k].abs()))
        who = _who(owners, drawn)
        ha = "left" if xk < 0.6 else "right"  # keep the text inside the panel
        text = (
            f"{who}: pushes\n{_fmt_big(value)}× harder than REINFORCE\n"
            f"(r = {_fmt_big(float(curve.ratio[k]))})"
        )
        _note(
            ax,
            text,
            xy=(xk, yk),
            xycoords="axes fraction",
            xytext=(20 if ha == "left" else -20, 6),
            textcoords="offset points",
            fontsize=10,
            ha=ha,
            va="bottom",
            zorder=7,
            arrowprops={"arrowstyle": "->", "lw": 0.9},
        )
        w = 0.05 + CHAR_WIDTH * max(len(line) for line in text.splitlines())
        boxes.append((xk, xk + w, yk, yk + 0.16) if ha == "left" else (xk - w, xk, yk, yk + 0.16))
    return boxes


def _annotate_fading(
    ax: Any, x: Tensor, drawn: list[tuple[Curve, str]], threshold: float
) -> list[Box]:
    """Mark the smallest non-zero amplification when a loss fades below 1/threshold."""
    lows: dict[tuple[int, float], list[tuple[Curve, str]]] = {}
    for curve, label in drawn:
        amp = torch.nan_to_num(curve.amplification, nan=float("inf"))
        amp = torch.where(curve.zero | (amp <= 0), float("inf"), amp)
        k = int(amp.argmin())
        if float(amp[k]) < 1 / threshold:
            lows.setdefault((k, float(amp[k])), []).append((curve, label))
    boxes = []
    for i, ((k, value), owners) in enumerate(lows.items()):
        curve = owners[0][0]
        top = 0.56 - 0.12 * i
        _note(
            ax,
            f"{_who(owners, drawn)}: pushes only {_fmt_big(value)}× as hard as REINFORCE\n"
            f"(r = {_fmt_big(float(curve.ratio[k]))}): the token barely counts",
            xy=(float(x[k]), float(curve.grad_sampled[k].abs())),
            xytext=(0.04, top),
            textcoords="axes fraction",
            fontsize=9.5,
            va="top",
            zorder=7,
            arrowprops={"arrowstyle": "->", "lw": 0.9},
        )
        boxes.append((0.04, 0.5, top - 2 * LINE_HEIGHT, top))
    return boxes


def _unclipped_notes(
    ax: Any, x: Tensor, drawn: list[tuple[Curve, str]], infos: dict[str, Any], threshold: float
) -> list[Box]:
    """Where a loss that has rules is amplified and none fires, say so, and which are off.

    Series with the same finding (variants that differ elsewhere) share one note.
    """
    notes: dict[tuple[str, int, int, tuple[str, ...]], list[tuple[Curve, str]]] = {}
    for curve, label in drawn:
        declared = infos[curve.loss].rules
        hot = (curve.amplification > threshold) & ~curve.fired & ~curve.zero
        found = runs(hot) if declared else []
        if found:
            first, last = max(found, key=lambda r: r[1] - r[0])
            disabled = tuple(r for r in declared if r not in curve.regions)
            notes.setdefault((curve.loss, first, last, disabled), []).append((curve, label))
    boxes = []
    top = 0.62
    for (_, first, last, disabled), owners in notes.items():
        curve = owners[0][0]
        k = (first + last) // 2
        text = f"{_who(owners, drawn)} keeps growing here:\nnone of its rules fires"
        if disabled:
            own = infos[curve.loss].rule_words
            text += "; off in this run:\n" + "\n".join(f"  {rule_text(r, own)}" for r in disabled)
        _note(
            ax,
            text,
            xy=(float(x[k]), float(curve.grad_sampled[k].abs())),
            xytext=(0.42, top),
            textcoords="axes fraction",
            fontsize=9.5,
            ha="left",
            va="top",
            zorder=7,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.9},
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
        height = LINE_HEIGHT * (text.count("\n") + 1)
        boxes.append((0.42, 1.0, top - height, top))
        top -= height + 0.03
    return boxes


def _ratio_axis(ax: Any, name: str, other: float) -> None:
    """A second x axis on top with r = π_θ(y)/π_old(y)."""
    import numpy as np

    def forward(v: Any) -> Any:
        v = np.asarray(v, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return other / v if name == "pi_old" else v / other

    def inverse(r: Any) -> Any:
        r = np.asarray(r, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return other / r if name == "pi_old" else r * other

    top = ax.secondary_xaxis("top", functions=(forward, inverse))
    top.set_xlabel("r = π_θ(y) / π_old(y)", fontsize=9.5)


# ----------------------------------------------------------------------------- 2-D


def _heat_maps(outcome: SweepOutcome) -> Any:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    report, grid = outcome.report, outcome.grid
    old_axis, theta_axis = grid.axes
    n_theta, n_old = grid.shape
    by_sign = {s: _distinct([c for c in outcome.curves if c.advantage * s > 0]) for s in SIGNS}
    columns = max(len(v) for v in by_sign.values())

    magnitudes = torch.cat([c.grad_sampled.abs() for c in outcome.curves])
    positive = magnitudes[magnitudes > 0]
    vmax = float(positive.max()) if positive.numel() else 1.0
    vmin = max(float(positive.min()), vmax * DECADES_SHOWN) if positive.numel() else 1e-3
    norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10))

    fig = Figure(figsize=(3.6 * columns + 1.6, 7.6), layout="constrained")
    axes = fig.subplots(len(SIGNS), columns, sharex=True, sharey=True, squeeze=False)
    x_edges, y_edges = _edges(old_axis).tolist(), _edges(theta_axis).tolist()
    mesh = None
    lo = max(float(old_axis.values[0]), float(theta_axis.values[0]))
    hi = min(float(old_axis.values[-1]), float(theta_axis.values[-1]))
    for row, sign in enumerate(SIGNS):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(by_sign[sign]):
                ax.set_visible(False)
                continue
            curve, label = by_sign[sign][col]
            z = curve.grad_sampled.abs().reshape(n_theta, n_old)
            z = torch.where(z > 0, z, float("nan"))
            ax.set_facecolor(ZERO_GREY)
            mesh = ax.pcolormesh(
                x_edges,
                y_edges,
                z.tolist(),
                norm=norm,
                cmap="viridis",
                shading="flat",
                rasterized=True,
            )
            amp = curve.amplification.reshape(n_theta, n_old)
            if curve.uses_advantage and bool((amp > report.amplified_above).any()):
                contour = ax.contour(
                    old_axis.values.tolist(),
                    theta_axis.values.tolist(),
                    amp.tolist(),
                    levels=[report.amplified_above],
                    colors="white",
                    linewidths=1.3,
                )
                ax.clabel(contour, fmt=f"{report.amplified_above:g}×", fontsize=9)
            _label_switched_off(ax, outcome, curve)
            if lo < hi:
                ax.plot([lo, hi], [lo, hi], color="white", ls="--", lw=1)
            ax.set_xscale("log" if old_axis.scale == "log" else "linear")
            ax.set_yscale("log" if theta_axis.scale == "log" else "linear")
            ax.set_title(f"{label}\n{sign_text(sign * report.advantage)}", fontsize=10.5)
            if row == len(SIGNS) - 1:
                ax.set_xlabel("π_old(y)")
            if col == 0:
                ax.set_ylabel(f"π_θ(y)\n({SIGN_WORDS[sign]})")
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=axes, shrink=0.85, pad=0.01)
        bar.set_label("|∂L/∂z_y| (log colour scale); grey = exactly 0")
    fig.suptitle(
        "How hard each loss pushes the sampled token's logit, |∂L/∂z_y|, over π_old(y) (x) and "
        f"π_θ(y) (y), |A| = {report.advantage:g}\n{setting_text(report)}\ndashed: r = 1 "
        f"(on-policy: PPO = REINFORCE);  white line: {report.amplified_above:g}× REINFORCE's "
        "gradient;  grey: exactly 0",
        fontsize=11.5,
    )
    return fig


def _label_switched_off(ax: Any, outcome: SweepOutcome, curve: Curve) -> None:
    """Name the rule in the middle of a sizeable region it switched off."""
    grid = outcome.grid
    off = curve.fired & curve.zero
    if float(off.double().mean()) < 0.05:
        return
    old, theta = grid.pi_old[off], grid.pi_theta[off]
    x_axis, y_axis = grid.axes
    cx = float(torch.exp(torch.log(old).mean())) if x_axis.scale == "log" else float(old.mean())
    cy = float(torch.exp(torch.log(theta).mean())) if y_axis.scale == "log" else float(theta.mean())
    rules = sorted({r for r, m in curve.regions.items() if bool((m & off).any())})
    own = {info.name: info for info in outcome.report.losses}[curve.loss].rule_words
    words = "\n".join(rule_text(r, own) for r in rules)
    ax.text(
        cx,
        cy,
        f"clipped:\n{words}\n→ 0",
        ha="center",
        va="center",
        fontsize=9,
        color="0.25",
        zorder=6,
    )


# ----------------------------------------------------------------------------- attribution

SIGN_COLORS = {"A > 0": "#1f77b4", "A < 0": "#d62728", "A = 0": "#7f7f7f"}
ATTRIBUTION_GROUPS = {
    "advantage_sign": "sign",
    "component": "term",
    "region": "region",
    "prob_bucket": "π_θ(y)",
    "position": "position",
}
SIGN_NAMES = {"positive": "A > 0", "negative": "A < 0", "zero": "A = 0"}


def plot_attribution(report: CompareReport, path: Path) -> None:
    """compare ``--plot``: per loss with an attribution section, each token's share of the
    lm_head update against π_θ(y), coloured by the sign of its advantage, and the group shares
    as bars (docs/attribution.md)."""
    check_plot_path(path)
    losses = [r for r in report.losses if r.attribution is not None]
    if not losses:
        engine = "" if report.engine is None else f" (engine {report.engine.path!r})"
        raise GradlensError(
            f"--plot draws the attribution, and no loss has one{engine}: "
            "set diagnostics.attribution on (auto runs it with the materialized engine only)"
        )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.6 * len(losses)), layout="constrained")
    axes = fig.subplots(len(losses), 2, squeeze=False, width_ratios=(1.5, 1))
    for row, loss in zip(axes, losses, strict=True):
        _share_scatter(row[0], loss)
        _group_bars(row[1], loss)
    b = report.batch
    fig.suptitle(
        f"where the lm_head update comes from: {b.num_tokens} tokens in {b.num_sequences} "
        f"sequences, V = {b.vocab_size} ({b.source.split(':')[0]})",
        fontsize=12,
    )
    with writing(path, "--plot", "wb") as fh:
        fig.savefig(fh, dpi=DPI, format=path.suffix.lower()[1:])


def plot_split(reports: list[SplitReport], path: Path) -> None:
    """compare ``--split … --plot``: one column per convention; on top, each sequence's weight
    factor w_split / w_full (the split's gradient on its tokens over the full batch's: g_t does
    not depend on the split, so the factor is the ratio of the two gradients token by token),
    a bar per sequence coloured by its micro-batch; below, the sequence lengths in the same
    colours with each micro-batch's token count (docs/split.md)."""
    check_plot_path(path)
    if not reports:
        raise GradlensError("--plot with --split: the report has no split section to draw")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.0, 6.5 * len(reports)), 7.5), layout="constrained")
    axes = fig.subplots(2, len(reports), squeeze=False, sharex="col", height_ratios=(1.6, 1))
    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
    ]  # fmt: skip
    for column, split in enumerate(reports):
        top, bottom = axes[0][column], axes[1][column]
        rows = [s.row for s in split.sequences]
        colour = [palette[s.micro_batch % len(palette)] for s in split.sequences]
        ratio = [1.0 if s.weight_ratio is None else s.weight_ratio for s in split.sequences]
        # bars grow from 1 (split = full batch), so a bar's length is the deviation itself
        top.bar(rows, [r - 1.0 for r in ratio], bottom=1.0, color=colour, width=0.8)
        top.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
        for s in split.sequences:
            if s.weight_ratio is None:
                top.text(s.row, 1.0, "no token", rotation=90, ha="center", va="bottom", fontsize=7)
        low = min([*ratio, 1.0])
        high = max([*ratio, 1.0])
        pad = 0.08 * (high - low) if high > low else 0.1
        top.set_ylim(max(0.0, low - pad), high + pad)
        top.set_ylabel("w_split / w_full per sequence\n(split gradient / full-batch gradient)")
        single = len(split.micro_batches) == 1
        verdict = "split-invariant" if split.invariant else "depends on the split"
        note = "one micro-batch: nothing is split; " if single else ""
        top.set_title(
            f"{split.framework} {split.setting} ({split.aggregation}, scope {split.scope})\n"
            f"micro={split.micro}, dp={split.dp}, ga={split.ga}: {note}{verdict}",
            fontsize=11,
        )
        bottom.bar(rows, [s.tokens for s in split.sequences], color=colour, width=0.8)
        for m in split.micro_batches:
            start, stop = m.rows
            middle = (start + stop - 1) / 2
            bottom.annotate(
                f"mb {m.index}: {m.tokens} tok",
                xy=(middle, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=8,
                color=palette[m.index % len(palette)],
            )
            if start > 0:
                for ax in (top, bottom):
                    ax.axvline(start - 0.5, color="0.75", linewidth=0.8)
        bottom.set_ylabel("sequence length (valid tokens)")
        bottom.set_xlabel("sequence (batch row), coloured by micro-batch")
    fig.suptitle(
        "the split's weight on each sequence against the full batch's; below 1: down-weighted",
        fontsize=12,
    )
    with writing(path, "--plot", "wb") as fh:
        fig.savefig(fh, dpi=DPI, format=path.suffix.lower()[1:])


def _share_scatter(ax: Any, loss: LossReport) -> None:
    a = loss.attribution
    assert a is not None
    points = a.points
    shares = [s for s in points.share if s is not None]
    small = min((abs(s) for s in shares if s != 0), default=1e-6)
    linthresh = max(small, 1e-3 * max((abs(s) for s in shares), default=1.0))
    for label, color in SIGN_COLORS.items():
        xs, ys = [], []
        for p, s, adv in zip(points.prob, points.share, points.advantage, strict=True):
            sign = "A > 0" if adv > 0 else "A < 0" if adv < 0 else "A = 0"
            if sign == label and p is not None and s is not None:
                xs.append(p)
                ys.append(s)
        if xs:
            share = sum(ys)
            ax.scatter(xs, ys, s=9, alpha=0.6, color=color, label=f"{label}: {share:.1%}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=linthresh)
    top = max(shares, default=linthresh)
    bottom = min(shares, default=-linthresh)
    low, high = min(-linthresh, 3 * bottom), max(linthresh, 3 * top)  # room above and below
    ax.set_ylim(low, high)
    # ticks at 0 and the decades outside the linear band only: none crowd around 0
    first = math.ceil(math.log10(linthresh))
    decades = [10.0**k for k in range(first, math.floor(math.log10(max(high, -low))) + 1)]
    ax.set_yticks(
        [-d for d in reversed(decades) if -d >= low] + [0.0] + [d for d in decades if d <= high]
    )
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("π_θ(y): the sampled token's probability")
    ax.set_ylabel("token share ⟨g_t h_tᵀ, G⟩/‖G‖²")
    shown = "" if len(points.prob) == points.total else f" ({len(points.prob)} largest shown)"
    ax.set_title(f"{loss.name}: each token's share of the lm_head update{shown}", fontsize=10)
    ax.legend(fontsize=8, loc="best", title="tokens by sign of A (sum of shares)")
    ax.grid(True, which="major", alpha=0.3)


def _group_bars(ax: Any, loss: LossReport) -> None:
    a = loss.attribution
    assert a is not None
    labels, values, colors = [], [], []
    for i, (group, prefix) in enumerate(ATTRIBUTION_GROUPS.items()):
        part = a.groups[group]
        for key, share in part.shares.items():
            labels.append(f"{prefix}: {SIGN_NAMES.get(key, key)}")
            values.append(0.0 if share is None else share)
            colors.append(COLORS[i % len(COLORS)])
    y = list(range(len(labels)))
    ax.barh(y, values, color=colors, alpha=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    for yi, v in zip(y, values, strict=True):  # right of the bar, or of 0 for a negative one
        ax.text(max(v, 0.0), yi, f" {v:.1%}", va="center", ha="left", fontsize=7)
    ax.set_xlabel("share of ‖G‖² (each group sums to 100%)")
    half = a.sequences_to_half
    words = "" if half is None else f"; half from {half} sequence{'s' if half > 1 else ''}"
    ax.set_title(f"{loss.name}: shares by group{words}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
