"""The TRL hook (gradlens.integrations.trl): the settings it maps, and a real GRPOTrainer run.

The slow test trains TRL's real GRPOTrainer on the built-in tiny LM on the CPU for 3 steps
(transformers generation, a toy reward; tests/integrations/tiny_grpo.py), diagnosing every 2nd
step, with the rewards of step 3 multiplied by 50: a forced grad_norm spike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gradlens.batchfile import read_batch_tensors
from gradlens.errors import GradlensError
from gradlens.integrations.trl import GradlensSettings, trl_loss_settings
from gradlens.sources.checkpoint import load_tokenizer
from gradlens.sources.tokenizer_digest import vocabulary_sha256


def fake_trainer(loss_type: str = "dapo", **over: Any) -> SimpleNamespace:
    args = SimpleNamespace(
        max_completion_length=16,
        delta=None,
        off_policy_mask_threshold=None,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        use_bias_correction_kl=True,
    )
    for key in list(over):
        if hasattr(args, key):
            setattr(args, key, over.pop(key))
    base = dict(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.0,
        importance_sampling_level="token",
        args=args,
    )
    return SimpleNamespace(**{**base, **over})


def test_trl_settings_map_to_the_twins_of_the_framework_parity_table() -> None:
    # the same twins tests/losses/test_frameworks.py checks against TRL's own _compute_loss
    assert trl_loss_settings(fake_trainer("dapo")) == (
        ("ppo_clip",),
        {
            "aggregation": "token_mean",
            "count_empty_sequences": False,
            "eps_low": 0.2,
            "eps_high": 0.28,
        },
    )
    names, loss = trl_loss_settings(fake_trainer("grpo", beta=0.04))
    assert names == ("grpo",) and loss["kl_coef"] == 0.04 and loss["kl_estimator"] == "unbiased"
    assert loss["aggregation"] == "seq_mean_token_mean" and loss["count_empty_sequences"]
    _, loss = trl_loss_settings(fake_trainer("bnpo", beta=0.1, use_bias_correction_kl=False))
    assert loss["kl_estimator"] == "k3"
    names, loss = trl_loss_settings(fake_trainer("dr_grpo", delta=3.0))
    assert names == ("ppo_clip",) and loss["loss_scale_factor"] == 16.0 and loss["dual_clip"] == 3.0
    names, loss = trl_loss_settings(fake_trainer("cispo", epsilon_high=1.5))
    assert names == ("cispo_cap",) and loss["cispo_cap"] == 1.5
    names, loss = trl_loss_settings(fake_trainer("sapo"))
    assert names == ("sapo",) and (loss["tau_pos"], loss["tau_neg"]) == (1.0, 1.05)
    names, _ = trl_loss_settings(fake_trainer("grpo", importance_sampling_level="sequence"))
    assert names == ("gspo",)
    _, loss = trl_loss_settings(fake_trainer("dapo", off_policy_mask_threshold=0.5))
    assert loss["opsm_delta"] == 0.5


def test_trl_settings_name_what_they_cannot_map() -> None:
    with pytest.raises(GradlensError, match=r"loss_type 'vespo' has no gradlens twin"):
        trl_loss_settings(fake_trainer("vespo"))
    with pytest.raises(GradlensError, match=r"GradlensSettings\.every_n_steps: must be ≥ 1"):
        GradlensSettings(every_n_steps=0)
    with pytest.raises(GradlensError, match=r"GradlensSettings\.spike_factor: must be > 0"):
        GradlensSettings(spike_factor=-1.0)
    with pytest.raises(GradlensError, match=r"GradlensSettings\.losses: a tuple"):
        GradlensSettings(losses="ppo_clip")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the real run

STEPS, EVERY, SPIKE_STEP = 3, 2, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    pytest.importorskip("trl")
    from tests.integrations.tiny_grpo import build_trainer

    out = tmp_path_factory.mktemp("trl_run")
    settings = GradlensSettings(
        every_n_steps=EVERY, spike_factor=3.0, spike_min_history=2, model_path="builtin"
    )
    trainer = build_trainer(out, steps=STEPS, gradlens=settings, spike_at=SPIKE_STEP)
    trainer.train()
    return trainer, out / "gradlens"


def step_logs(trainer: Any) -> dict[int, dict[str, float]]:
    return {row["step"]: row for row in trainer.state.log_history if "grad_norm" in row}


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


@pytest.mark.slow
def test_metrics_reach_the_trainers_log_at_the_diagnosed_steps(run: tuple[Any, Path]) -> None:
    trainer, _ = run
    logs = step_logs(trainer)
    assert sorted(logs) == [1, 2, 3]
    # every_n_steps=2 diagnoses step 2; step 3 is diagnosed because it spiked; step 1 neither
    assert not any(k.startswith("gradlens/") for k in logs[1])
    for step in (2, 3):
        assert logs[step]["gradlens/grpo/lm_head_norm"] > 0  # dapo + beta: grpo, token_mean
        assert logs[step]["gradlens/grpo/trl/kl"] >= 0
    # TRL's own KL metric (k3 on TRL's log-probs) and gradlens's, recomputed from the captured
    # hidden states: float32 log-softmax over V = 2048 twice, ~1e-6 apart per token; the KL at
    # these steps is ~1e-3, so 1e-2 relative is far above that rounding and far below any
    # misalignment of hidden states and tokens (which changes the KL by O(1))
    assert close(logs[2]["gradlens/grpo/trl/kl"], logs[2]["kl"], 1e-2)
    assert close(logs[3]["gradlens/grpo/trl/kl"], logs[3]["kl"], 1e-2)


@pytest.mark.slow
def test_a_spike_writes_the_batch_file_and_its_sidecar(run: tuple[Any, Path]) -> None:
    trainer, out = run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3]
    logs = step_logs(trainer)
    for row in lines:
        assert row["grad_norm"] == pytest.approx(logs[row["step"]]["grad_norm"], rel=1e-12)
    assert [row["spike"] for row in lines] == [False, False, True]
    # step 3's rewards ×50 → its grad_norm is far above 3 × median(steps 1, 2)
    assert lines[2]["grad_norm"] > 3 * lines[2]["running_median"]
    assert lines[2]["batch_file"] == "step_000003.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl",
        "step_000003.json",
        "step_000003.safetensors",
    ]
    side = json.loads((out / "step_000003.json").read_text())
    assert side["step"] == 3 and side["losses"] == ["grpo"] and side["model_path"] == "builtin"
    assert side["loss"]["kl_coef"] == 0.04 and side["loss"]["kl_estimator"] == "unbiased"
    # the trainer's tokenizer made the ids: the file names its vocabulary
    stored = read_batch_tensors(out / "step_000003.safetensors")["tokenizer_sha256"]
    assert torch.equal(stored, vocabulary_sha256(load_tokenizer("builtin")))


@pytest.mark.slow
def test_rediagnosing_the_file_offline_reproduces_the_live_numbers(run: tuple[Any, Path]) -> None:
    from gradlens.compare.run import compare_batch, resolve_device, source_context
    from gradlens.config import validate
    from gradlens.sources import build_source

    trainer, out = run
    side = json.loads((out / "step_000003.json").read_text())
    # what `gradlens compare --set source.path=step_000003.safetensors` with the sidecar's
    # settings runs: the batch-file source, then the compare pipeline
    cfg = validate(
        {
            "source": {"kind": "batch", "path": str(out / "step_000003.safetensors")},
            "dtype": side["dtype"],
            "losses": side["losses"],
            "loss": side["loss"],
            "diagnostics": {"reference": "none", **side["diagnostics"]},
        }
    )
    device = resolve_device(cfg.device)
    offline = compare_batch(build_source(cfg.source, source_context(cfg, device)), cfg, device)
    metrics = offline.metrics()
    live = step_logs(trainer)[SPIKE_STEP]
    keys = [k for k in live if k.startswith("gradlens/")]
    assert len(keys) > 50 and set(keys) <= set(metrics)
    # the file holds the very float32 tensors the live diagnosis read, and both run the same
    # code on them: equal to the last bit (TRL's log only averages one value per key here)
    for key in keys:
        assert metrics[key] == live[key] or (math.isnan(metrics[key]) and math.isnan(live[key])), (
            key
        )
