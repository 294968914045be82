"""The sweep figure: every curve can be seen, and the call-outs are words.

Visible means: inside its panel, each loss's curve shows a patch of its own colour at least
4 × 4 pixels — a line of its own, or a marker — even where it coincides with another loss
(SFT lies on REINFORCE at |A| = 1, ppo_clip on ppo wherever the clip is off). A 2-pixel line
drawn inside a wider one of another colour has no such patch: it reads as a stripe of the
other line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from gradlens.report.plots import sweep_figure  # noqa: E402
from gradlens.sweep import build_sweep_config, run_sweep  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PATCH = 4  # pixels on a side
FIGURES = {
    "default": None,
    "sweep_pi_theta": CONFIGS / "sweep_pi_theta.yaml",
    "sweep_dual_clip": CONFIGS / "sweep_dual_clip.yaml",
}


def _figure(name: str):
    return sweep_figure(run_sweep(build_sweep_config(FIGURES[name])))


def _has_patch(mask) -> bool:
    """Whether ``mask`` [H, W] holds a PATCH × PATCH square of True."""
    if mask.shape[0] < PATCH or mask.shape[1] < PATCH:
        return False
    total = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    p = PATCH
    sums = total[p:, p:] - total[:-p, p:] - total[p:, :-p] + total[:-p, :-p]
    return bool((sums == p * p).any())


def _curves(ax) -> dict[str, list]:
    """The loss curves of a panel by colour: every line that is not black (the guides)."""
    out: dict[str, list] = {}
    for line in ax.get_lines():
        rgb = to_rgb(line.get_color())
        if rgb != (0.0, 0.0, 0.0):
            out.setdefault(line.get_color(), []).append(line)
    return out


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if i == 0 else [pytest.mark.slow]) for i, n in enumerate(FIGURES)],
)  # a figure each: the first alone in the fast subset
def test_every_curve_shows_a_patch_of_its_own_colour(name: str):
    fig = _figure(name)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    height = pixels.shape[0]
    checked = 0
    for ax in fig.axes:
        curves = _curves(ax)
        if not curves:
            continue
        box = ax.get_window_extent()
        rows = slice(int(height - box.y1) + 1, int(height - box.y0) - 1)
        cols = slice(int(box.x0) + 1, int(box.x1) - 1)
        panel = pixels[rows, cols]
        for color, lines in curves.items():
            y = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in lines])
            if not np.isfinite(y).any():
                continue  # switched off over the whole panel: nothing to see
            rgb = np.array([round(255 * c) for c in to_rgb(color)], dtype=pixels.dtype)
            assert _has_patch((panel == rgb).all(-1)), (
                f"{name}: {color} hidden in '{ax.get_title()}'"
            )
            checked += 1
    assert checked >= 5  # every figure has two panels of at least three curves in all


def test_the_call_outs_are_words():
    texts = [t.get_text() for t in _figure("default").findobj(Text)]
    joined = "\n".join(texts)
    assert "→" not in joined  # no "→ ∂L/∂z_y = 0" shorthand
    # the clip's band, the explosion and the unclipped branch, in sentences
    assert (
        "ppo_clip: no gradient here,\nthe clip switches the token off\n(A > 0 and r > 1+ε_high)"
        in texts
    )
    assert any("harder than REINFORCE" in t for t in texts)
    assert any(t.startswith("ppo_clip keeps growing here:\nnone of its rules fires") for t in texts)
    fading = "\n".join(t.get_text() for t in _figure("sweep_pi_theta").findobj(Text))
    assert "as hard as REINFORCE" in fading and "the token barely counts" in fading
