"""``--parity-matrix``: the same parity pairs under every combination of a few settings.

Each combination is one `run_compare` on its own validated config; they run one after the
other in this process, so a framework is imported once (`gradlens.losses.frameworks` caches
what it imports) however many settings and pairs there are. Pure: configs in, a
`ParityMatrixReport` out.
"""

from __future__ import annotations

from typing import Any

from gradlens.compare.run import run_compare
from gradlens.config import Config
from gradlens.errors import GradlensError
from gradlens.results import ParityMatrixEntry, ParityMatrixReport


def run_parity_matrix(
    base: Config, runs: list[tuple[dict[str, Any], Config]]
) -> ParityMatrixReport:
    """Every (settings, config) of ``runs``; ``base`` is the configuration they vary."""
    if base.parity is None:
        raise GradlensError("--parity-matrix needs at least one --parity A,B pair")
    entries = []
    environment = None
    for settings, config in runs:
        report = run_compare(config)
        environment = environment or report.environment
        entries.append(
            ParityMatrixEntry(settings=settings, parity=report.parity, passed=report.passed)
        )
    assert environment is not None, "a matrix has at least one run"
    return ParityMatrixReport(
        environment=environment,
        config=base.model_dump(mode="json"),
        entries=entries,
        passed=all(e.passed for e in entries),
    )
