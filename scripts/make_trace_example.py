#!/usr/bin/env python3
"""Make the example run of docs/trace.md: docs/examples/trl_run (and its figure).

    python scripts/make_trace_example.py

TRL's real GRPOTrainer on the built-in tiny LM, on the CPU, 6 steps, every step diagnosed by
the gradlens hook, with the rewards of step 5 multiplied by 50 (tests/integrations/
tiny_grpo.py): a grad_norm spike the hook dumps as step_000005.safetensors. Then
``gradlens trace docs/examples/trl_run --plot docs/examples/trl_run.png``. Needs TRL (about two
minutes on two CPU cores).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "examples" / "trl_run"


def main() -> None:
    from gradlens.integrations.trl import GradlensSettings
    from tests.integrations.tiny_grpo import build_trainer

    if OUT.exists():
        shutil.rmtree(OUT)
    settings = GradlensSettings(
        every_n_steps=1, spike_factor=3.0, output_dir=str(OUT), model_path="builtin"
    )
    with tempfile.TemporaryDirectory() as work:
        build_trainer(work, steps=6, gradlens=settings, spike_at=5).train()
    figure = OUT.parent / "trl_run.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlens",
            "trace",
            str(OUT.relative_to(ROOT)),
            "--plot",
            str(figure.relative_to(ROOT)),
        ],
        cwd=ROOT,
        check=True,
    )


if __name__ == "__main__":
    main()
