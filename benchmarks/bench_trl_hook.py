"""Benchmark: the TRL hook's overhead, the same GRPOTrainer run with and without it.

    python benchmarks/bench_trl_hook.py                      # 4 steps, 2 rounds, CPU
    python benchmarks/bench_trl_hook.py --steps 6 --rounds 3 \
        --json benchmarks/results/trl_hook_cpu.json

The run is tests/integrations/tiny_grpo.py's: TRL's real GRPOTrainer on the built-in tiny LM
(V = 2048, H = 192, 2.2 M parameters), 4 prompts × 4 generations of ≤ 16 tokens per step,
β = 0.04 (a reference model), loss_type dapo, on the CPU. Each round trains the plain
trainer and the hooked one (every_n_steps = 1: every step diagnosed, the most expensive
setting; no spike dumps) with the same seed, alternating which goes first, so that both see
the same machine load. Reported: the wall time of ``trainer.train()`` for each, their ratio
(hooked / plain, per round and the median), and the time spent inside the hook's diagnosis
(`GradlensGRPOMixin.gradlens_diagnose`, measured in the hooked run itself) as a share of the
hooked run: the part of the ratio that is gradlens's own work rather than machine noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed_run(steps: int, hooked: bool) -> dict[str, float]:
    import torch

    from gradlens.integrations.trl import GradlensGRPOMixin, GradlensSettings
    from tests.integrations.tiny_grpo import build_trainer

    inside = [0.0]
    original = GradlensGRPOMixin.gradlens_diagnose

    def counted(self: Any, micro: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return original(self, micro)
        finally:
            inside[0] += time.perf_counter() - t0

    GradlensGRPOMixin.gradlens_diagnose = counted  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as out:
            settings = GradlensSettings(every_n_steps=1, spike_factor=None) if hooked else None
            trainer = build_trainer(out, steps=steps, gradlens=settings)
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
    finally:
        GradlensGRPOMixin.gradlens_diagnose = original  # type: ignore[method-assign]
    del torch
    return {"train_s": wall, "diagnose_s": inside[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    opts = parser.parse_args()
    import torch
    import transformers
    import trl

    rounds = []
    for r in range(opts.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        result = {("hooked" if h else "plain"): timed_run(opts.steps, h) for h in order}
        result["ratio"] = {"value": result["hooked"]["train_s"] / result["plain"]["train_s"]}
        rounds.append(result)
        print(
            f"round {r + 1}: plain {result['plain']['train_s']:.1f} s, hooked "
            f"{result['hooked']['train_s']:.1f} s "
            f"(diagnosis {result['hooked']['diagnose_s']:.2f} s)"
            f", ratio {result['ratio']['value']:.3f}",
            flush=True,
        )
    summary = {
        "steps": opts.steps,
        "every_n_steps": 1,
        "ratio_median": statistics.median(r["ratio"]["value"] for r in rounds),
        "diagnose_share_median": statistics.median(
            r["hooked"]["diagnose_s"] / r["hooked"]["train_s"] for r in rounds
        ),
        "diagnose_per_step_s_median": statistics.median(
            r["hooked"]["diagnose_s"] / opts.steps for r in rounds
        ),
        "rounds": rounds,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
