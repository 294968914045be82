"""gradlens: gradient diagnostics for LLM policy-gradient and SFT losses.

Every loss in scope touches the logits of position t only through the sampled token's
log-prob ℓ_t = log π_θ(y_t), so its logit gradient is c_t·(e_y − π_t) with one scalar c_t per
token. gradlens computes that scalar for each loss, turns it into logit and lm_head gradients,
checks the result against autograd, and reduces it to the numbers a practitioner reads.

The Python API: `gradlens.diagnose` (gradlens.api, docs/api.md) and `gradlens.GradlensError`.
``diagnose`` is resolved on first use (PEP 562), so that ``import gradlens`` and the CLI's
``--help`` stay fast: the API imports torch and the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradlens.errors import GradlensError

__version__ = "0.1.0"
__all__ = ["GradlensError", "__version__", "diagnose"]


def __getattr__(name: str) -> Any:
    if name == "diagnose":
        return importlib.import_module("gradlens.api").diagnose
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")
