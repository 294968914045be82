"""The loss registry. Importing this package registers every built-in loss, in this order."""

# isort: off
from gradlens.losses import reinforce, ppo, sft  # noqa: F401  (registration side effect)
from gradlens.losses import grpo, gspo, cispo, sapo, minirl  # noqa: F401
from gradlens.losses import opd  # noqa: F401
from gradlens.losses import dppo, m2po, aspo, gppo, covariance, gmpo  # noqa: F401
from gradlens.losses import topr, dro, luspo, vespo, real, fipo, rollout_anchored  # noqa: F401

# isort: on
from gradlens.losses.aggregation import AGGREGATIONS, Aggregation, aggregation_weights
from gradlens.losses.base import LossParams, LossSpec
from gradlens.losses.registry import get_loss, loss_names, register

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "LossParams",
    "LossSpec",
    "aggregation_weights",
    "get_loss",
    "loss_names",
    "register",
]
