"""The ``mismatch`` section: the training–inference gap localised (docs/mismatch.md).

It gathers, for a batch with rollout log-probs μ, the frameworks' statistics of the gap
(gradlens.diagnostics.gap_statistics), its breakdown by π_old and by position
(gradlens.diagnostics.mismatch_buckets), the worst tokens with what each correction does to
them (gradlens.diagnostics.worst_tokens) and the figure's histogram and threshold lines
(gradlens.diagnostics.mismatch_histogram). The ESS's cap is the run's token TIS cap, else verl's
default rollout_is_threshold 2; the band of ``outside_band`` is TRL issue 6789's [0.9, 1.1].
"""

from __future__ import annotations

from torch import Tensor

from gradlens.diagnostics.gap_statistics import BAND, gap_statistics
from gradlens.diagnostics.mismatch_buckets import by_position, by_probability
from gradlens.diagnostics.mismatch_histogram import mismatch_histogram, threshold_lines
from gradlens.diagnostics.token_text import TokenTexts
from gradlens.diagnostics.worst_tokens import correction_label, probe_corrections, worst_tokens
from gradlens.losses.base import Correction
from gradlens.results import MismatchReport

DEFAULT_IS_CAP = 2.0  # verl's rollout_is_threshold


def is_cap(corrections: tuple[Correction, ...]) -> float:
    """The run's token TIS cap, or verl's default."""
    for c in corrections:
        if c.kind == "token_tis" and c.high is not None:
            return c.high
    return DEFAULT_IS_CAP


def mismatch_report(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    top_k: int,
    corrections: tuple[Correction, ...] = (),
    texts: TokenTexts | None = None,
) -> MismatchReport:
    """The section of [N, T] log π_old and log μ over ``mask`` (the module docstring)."""
    probes = probe_corrections(corrections)
    return MismatchReport(
        statistics=gap_statistics(old_logp, rollout_logp, mask, is_cap(corrections), BAND),
        by_probability=by_probability(old_logp, rollout_logp, mask, BAND),
        by_position=by_position(old_logp, rollout_logp, mask, BAND),
        worst=worst_tokens(old_logp, rollout_logp, mask, top_k, probes, texts),
        corrections=[correction_label(c) for c in probes],
        thresholds=threshold_lines(probes, BAND),
        histogram=mismatch_histogram(old_logp, rollout_logp, mask),
    )
