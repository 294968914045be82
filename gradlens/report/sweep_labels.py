"""Words shared by the sweep's table and plot: what each rule means, how a range reads.

The rule names are the region keys the losses report (`LossTerms.regions`); a rule not listed
here (a loss added later) is shown by its name.
"""

from __future__ import annotations

from collections.abc import Mapping

from gradlens.sweep.results import Interval, SweepReport

RULE_TEXT = {
    "clip_upper": "A > 0 and r > 1+ε_high",
    "clip_lower": "A < 0 and r < 1−ε_low",
    "clip_dual": "A < 0 and r > c (dual clip)",
    "seq_masked": "A < 0 and log(π_old/π_θ) > δ (OPSM)",
    "ratio_capped": "r > C (weight capped at C)",
    "ratio_truncated": "A < 0 and r > 1 (weight cut to 1)",
    "cov_selected": "selected by its covariance (A − Ā)(ℓ − ℓ̄)",
    "m2_masked": "among the largest (ℓ_μ − ℓ_old)² (M2PO)",
    "is_masked": "r_μ outside (1−ε_low, 1+ε_high)",
    "tv_masked": "|π_θ − μ| > threshold",
    "entropy_masked": "H below the top-entropy quantile",
}


# What each rule is, for a sentence: "<name> switches the token off".
RULE_NAME = {
    "clip_upper": "the clip",
    "clip_lower": "the clip",
    "clip_dual": "the dual clip",
    "seq_masked": "the off-policy sequence mask",
}


def rule_text(name: str, words: Mapping[str, str] | None = None) -> str:
    """What rule ``name`` means: the loss's own ``words`` for it, else the shared words."""
    if words and name in words:
        return words[name]
    return RULE_TEXT.get(name, name)


def rule_name(name: str) -> str:
    """What rule ``name`` is, for "<name> switches the token off"; a loss's own rule: its rule."""
    return RULE_NAME.get(name, "its rule")


def num(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits; '—' for a missing value."""
    return "—" if x is None else f"{x:.{digits}g}"


def sign_text(advantage: float) -> str:
    return f"A = {'+' if advantage > 0 else '−'}{abs(advantage):g}"


def runs_text(symbol: str, runs: list[Interval]) -> str:
    """'π_old ∈ [1e-06, 0.38]' for each run, joined by ' ∪ '; 'nowhere' for none."""
    if not runs:
        return "nowhere"
    parts = [
        f"{symbol} = {num(r.low)}" if r.low == r.high else f"[{num(r.low)}, {num(r.high)}]"
        for r in runs
    ]
    if len(parts) == 1 and not parts[0].startswith(symbol):
        return f"{symbol} ∈ {parts[0]}"
    return " ∪ ".join(p if p.startswith(symbol) else f"{symbol} ∈ {p}" for p in parts)


def setting_text(report: SweepReport, support: bool = True) -> str:
    """The loss settings that shape the curves, in one line; a swept one shows its values;
    with ``support``, the kept set's settings (`support_parts`) after them."""
    loss = report.config["loss"]
    over = report.config.get("over", {})

    def show(key: str, words: str, value: str) -> str:
        values = over.get(f"loss.{key}")
        if values is not None:
            return f"{words} ∈ {{{', '.join('null' if v is None else str(v) for v in values)}}}"
        return f"{words} {value}"

    dual = "off" if loss["dual_clip"] is None else f"c = {loss['dual_clip']:g}"
    parts = [
        show("eps_low", "ε_low", f"= {loss['eps_low']:g}"),
        show("eps_high", "ε_high", f"= {loss['eps_high']:g}"),
        show("dual_clip", "dual clip", dual),
    ]
    if loss["opsm_delta"] is not None or "loss.opsm_delta" in over:
        parts.append(show("opsm_delta", "OPSM δ", f"= {loss['opsm_delta']}"))
    parts.append(show("aggregation", "aggregation", loss["aggregation"]))
    if loss["loss_scale_factor"] is not None or "loss.loss_scale_factor" in over:
        parts.append(show("loss_scale_factor", "loss_scale_factor", f"{loss['loss_scale_factor']}"))
    if support:
        parts += support_parts(report)
    return ", ".join(parts)


def support_parts(report: SweepReport) -> list[str]:
    """The kept set's settings (gradlens.sweep.support), when they are not the defaults."""
    loss, over = report.config["loss"], report.config.get("over", {})
    support = report.config.get("support") or {}
    swept = [key for key in over if key.startswith("support.")]
    kept_mass = support.get("kept_mass", 1.0)
    old_mass = support.get("old_kept_mass")
    if kept_mass == 1.0 and old_mass in (None, 1.0) and not swept:
        if loss.get("sampling_support") == "kept" or "loss.sampling_support" in over:
            return ["kept set: none (S_θ = 1: replay changes nothing)"]
        return []

    def value(key: str, words: str, shown: str) -> str:
        values = over.get(f"support.{key}")
        if values is not None:
            return f"{words} ∈ {{{', '.join('null' if v is None else str(v) for v in values)}}}"
        return f"{words} = {shown}"

    replay = over.get("loss.sampling_support")
    if old_mass is None and "support.old_kept_mass" not in over:
        masses = [value("kept_mass", "kept mass S_θ = S_old", f"{kept_mass:g}")]
    else:
        old = "S_θ" if old_mass is None else f"{old_mass:g}"
        masses = [
            value("kept_mass", "kept mass S_θ", f"{kept_mass:g}"),
            value("old_kept_mass", "S_old", old),
        ]
    return [
        *masses,
        value("old_logp", "stored ℓ_old", str(support.get("old_logp", "full"))),
        f"sampling_support ∈ {{{', '.join(map(str, replay))}}}"
        if replay is not None
        else f"sampling_support {loss.get('sampling_support', 'full')}",
    ]


def axes_text(report: SweepReport) -> str:
    """'π_old(y) ∈ [1e-06, 1], 301 log-spaced points; π_θ(y) = 0.5; |A| = 1'."""
    spacing = {"log": "log-spaced", "linear": "evenly spaced"}
    parts = [
        f"{a.symbol}(y) ∈ [{a.min:g}, {a.max:g}], {a.points} {spacing[a.scale]} points"
        for a in report.axes
    ]
    parts += [
        f"{'π_old' if name == 'pi_old' else 'π_θ'}(y) = {value:g}"
        for name, value in report.fixed.items()
    ]
    parts.append(f"|A| = {report.advantage:g}")
    return "; ".join(parts)
