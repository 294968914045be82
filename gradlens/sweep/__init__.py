"""``gradlens sweep``: each loss's sampled-row logit gradient across π_old(y) and π_θ(y).

grid.py (the points) → curves.py (closed form, every registered loss) → check.py (autograd at
a subset) → summary.py (where zero, where amplified, the maximum) → run.py (all of it, as a
`SweepOutcome`). config.py holds the `SweepConfig`; results.py the typed report and record;
records.py turns the curves into flat rows for the data formats.
"""

from gradlens.sweep.config import SweepConfig, build_sweep_config
from gradlens.sweep.run import SweepOutcome, run_sweep

__all__ = ["SweepConfig", "SweepOutcome", "build_sweep_config", "run_sweep"]
