"""Every result model of ``gradlens compare``: the report and its sections, in one home.

``report`` holds the report and the per-loss diagnostics; ``model`` the sections of a real
checkpoint; ``rollout`` the training–inference statistics both build on. The JSON schema is
generated from `CompareReport` (``gradlens schema``).
"""

from gradlens.results.base import Result
from gradlens.results.model import (
    PREDICTION_FACTOR,
    GradGroup,
    GradNormPrediction,
    Mismatch,
    ModelGradients,
    ModelInfo,
    ModelPass,
    ModelReport,
    RolloutSample,
    RolloutSummary,
    SftOverRl,
    Staleness,
    StaleStep,
)
from gradlens.results.report import (
    SCHEMA_VERSION,
    Agreement,
    BatchSummary,
    Check,
    Clipping,
    CompareReport,
    EngineInfo,
    Environment,
    LossReport,
    MetricName,
    ParityPosition,
    ParityReport,
    ParitySide,
    RatioStats,
    RowGroup,
    RowNorms,
    SampledRow,
    TokenDetail,
    TopRow,
    ZeroSum,
)
from gradlens.results.rollout import RolloutStats

__all__ = [
    "PREDICTION_FACTOR",
    "SCHEMA_VERSION",
    "Agreement",
    "BatchSummary",
    "Check",
    "Clipping",
    "CompareReport",
    "EngineInfo",
    "Environment",
    "GradGroup",
    "GradNormPrediction",
    "LossReport",
    "MetricName",
    "Mismatch",
    "ModelGradients",
    "ModelInfo",
    "ModelPass",
    "ModelReport",
    "ParityPosition",
    "ParityReport",
    "ParitySide",
    "RatioStats",
    "Result",
    "RolloutSample",
    "RolloutStats",
    "RolloutSummary",
    "RowGroup",
    "RowNorms",
    "SampledRow",
    "SftOverRl",
    "StaleStep",
    "Staleness",
    "TokenDetail",
    "TopRow",
    "ZeroSum",
]
