"""A real TRL GRPOTrainer run on gradlens's built-in tiny LM, on the CPU, in seconds per step.

Shared by tests/integrations/test_trl.py, benchmarks/bench_trl_hook.py and
scripts/make_trace_example.py (the example run in docs/examples/trl_run). Needs TRL.

The toy reward is a hash of the completion's text in [0, 1): deterministic, different for
different completions, so every group of generations has advantages ≠ 0. ``spike_at=s``
multiplies the rewards of step s by ``SPIKE_SCALE``; with ``scale_rewards="none"`` (advantage
= reward − group mean) the advantages, and so the policy gradient, of that step grow by the
same factor: a forced grad_norm spike, as a reward bug would make one.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY_LM = Path(__file__).resolve().parents[2] / "gradlens" / "data" / "tiny_lm"
SPIKE_SCALE = 50.0


def toy_reward(spike_at: int | None = None) -> Callable[..., list[float]]:
    calls = [0]

    def hash_reward(completions: list[str], **kwargs: Any) -> list[float]:
        calls[0] += 1  # one call per generation batch: one per step here
        scale = SPIKE_SCALE if calls[0] == spike_at else 1.0
        return [scale * (zlib.crc32(c.encode()) % 1000) / 1000 for c in completions]

    return hash_reward


def build_trainer(
    output_dir: str | Path,
    steps: int = 3,
    gradlens: Any = None,
    spike_at: int | None = None,
    beta: float = 0.04,
    loss_type: str = "dapo",
    seed: int = 0,
) -> Any:
    """A GRPOTrainer (with the gradlens hook when ``gradlens`` settings are given)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from gradlens.integrations.trl import gradlens_trainer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LM)
    model = AutoModelForCausalLM.from_pretrained(TINY_LM, dtype=torch.float32)  # config: fp16
    prompts = json.loads((TINY_LM / "prompts.json").read_text())["prompts"][:8]
    args = GRPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-4,
        beta=beta,
        loss_type=loss_type,
        epsilon_high=0.28,
        scale_rewards="none",
        seed=seed,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
    )
    kwargs: dict[str, Any] = dict(
        model=model,
        processing_class=tokenizer,
        reward_funcs=toy_reward(spike_at),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    if gradlens is None:
        return GRPOTrainer(**kwargs)
    return gradlens_trainer(GRPOTrainer)(gradlens=gradlens, **kwargs)
