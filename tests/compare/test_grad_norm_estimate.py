"""The seed post's grad-norm estimate judged against the measured whole-model norm."""

from __future__ import annotations

from gradlens.compare.grad_norm_estimate import PREDICTION_FACTOR, judge
from gradlens.results import GradNormPrediction


def prediction(predicted: float) -> GradNormPrediction:
    return GradNormPrediction(
        formula="|A|·mean(1 − π_y)·‖h‖",
        inputs="test",
        predicted=predicted,
        measured=None,
        ratio=None,
        per_token=None,
        threshold=PREDICTION_FACTOR,
        agrees=False,
    )


def test_both_zero_agree_without_a_ratio_and_a_zero_estimate_of_a_real_norm_does_not():
    # every advantage 0: the estimate and the measured norm are both 0, which agrees
    both = judge(prediction(0.0), 0.0)
    assert both.agrees and both.ratio is None and both.measured == 0.0
    assert not judge(prediction(0.0), 1.0).agrees
    assert (
        judge(prediction(1.0), 1.5).agrees
        and not judge(prediction(1.0), 3 * PREDICTION_FACTOR).agrees
    )
