"""The command lines whose JSON reports are recorded in this folder (``record.py``) and
reproduced by ``tests/test_golden_reports.py``.

Each case is (name, argv, slow, setup): ``argv`` runs through the Typer app in-process;
``slow`` marks the case slow (left out of ``-m "not slow"``): every run on the synthetic default
batch or a model takes seconds, so the fast subset keeps the hand-written ``literal_*`` configs
and the sweeps;
``{tmp}`` in an argument is a per-case temporary directory; ``setup`` is an argv run first
in the same directory (a ``dump`` that the case then reads). Streamed runs fix the memory
budget and the chunk size, so that the plan does not depend on the machine's free memory.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STREAMED = ["--set", "diagnostics.memory_budget_mib=64", "--set", "diagnostics.vocab_chunk=512"]
MODEL_CONFIGS = {"model_builtin", "model_stale"}
# A pass through a model plans its micro-batches for the budget, by default from free memory:
# fixed here, so that the reports' budget_bytes do not depend on the machine.
MODEL_PASS = ["--set", "diagnostics.memory_budget_mib=512"]
# rollout_dtype auto picks bf16 by what the CPU computes natively: fixed to the former default.
MODEL_ROLLOUT = ["--set", "source.rollout_dtype=bfloat16"]
# so does source.stale.grad_dtype auto: fixed to the stale steps' backward in the model's dtype,
# what it was before the setting existed.
MODEL_STALE = ["--set", "source.stale.grad_dtype=model"]

# The cases whose reports depend on the CPU beyond what the pins equalize (tests/cpu_kernels.py):
# each samples completions from a bf16 rollout of a model and steps the model, so the last bits
# of every product reach μ, the learning-rate search and every statistic of them. Their reports
# in this folder were recorded on BASE_PLATFORM; another CPU's are recorded under
# platforms/<platform>/ (record.py writes there, with the CPU's kernel probe), and a CPU without
# them, or whose probe differs, skips these cases.
PLATFORM_BOUND = {"model_builtin", "model_stale", "batchfile_model"}
BASE_PLATFORM = "AuthenticAMD-avx512_bf16"

Case = tuple[str, list[str], bool, list[str] | None]


def cases() -> list[Case]:
    out: list[Case] = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        name = path.stem
        if name.startswith("sweep_"):
            out.append((name, ["sweep", "--config", str(path), "--format", "summary"], False, None))
        else:
            argv = ["compare", "--config", str(path), "--format", "json"]
            if name in MODEL_CONFIGS:
                argv += MODEL_PASS + MODEL_ROLLOUT + MODEL_STALE
            out.append((name, argv, not name.startswith("literal_"), None))
    compare = ["compare", "--format", "json"]
    policy_losses = ["--losses", "grpo,gspo,cispo,sapo,minirl,ppo_clip"]
    drift = ["--set", "source.rollout_drift=0.1", "--set", "source.ref_drift=0.2"]
    distill = ["--set", "source.teacher=perturbed", "--set", "loss.distill.divergence=jsd"]
    out += [
        ("sweep_default", ["sweep", "--format", "summary"], False, None),
        ("default_streamed", [*compare, "--engine", "streamed", *STREAMED], True, None),
        (
            "default_streamed_reference",
            [*compare, "--engine", "streamed", "--reference", "autograd", *STREAMED],
            True,
            None,
        ),
        ("parity_materialized", [*compare, "--parity", "ppo,ppo_clip"], True, None),
        (
            "parity_streamed",
            [*compare, "--parity", "ppo,ppo_clip", "--engine", "streamed", *STREAMED],
            True,
            None,
        ),
        ("policy_losses", [*compare, *policy_losses, *drift], True, None),
        (
            "policy_losses_corrections_entropy",
            [
                *compare,
                *policy_losses,
                *drift,
                "--set",
                "loss.corrections=[{kind: token_tis}, {kind: geo_mask, low: 0.5, high: 2}]",
                "--set",
                "loss.entropy_coef=0.01",
                "--set",
                "loss.aggregation=seq_mean_token_mean",
            ],
            True,
            None,
        ),
        (
            "policy_losses_entropy_streamed",
            [
                *compare,
                *policy_losses,
                *drift,
                "--set",
                "loss.entropy_coef=0.01",
                "--engine",
                "streamed",
                *STREAMED,
            ],
            True,
            None,
        ),
        (
            "attribution_streamed",
            [
                *compare,
                "--losses",
                "grpo,ppo_clip",
                *drift,
                "--set",
                "loss.entropy_coef=0.01",
                "--set",
                "loss.kl_coef=0.2",
                "--set",
                "diagnostics.attribution=on",
                "--engine",
                "streamed",
                *STREAMED,
            ],
            True,
            None,
        ),
        (
            "distill_synthetic",
            [*compare, "--losses", "ppo_clip,opd", *distill, "--set", "loss.distill.beta=0.3"],
            True,
            None,
        ),
        (
            "distill_batchfile_streamed",
            [
                *compare,
                "--losses",
                "ppo_clip,opd",
                "--set",
                "source.path={tmp}/distill.safetensors",
                "--set",
                "loss.distill.divergence=forward_kl",
                "--set",
                "loss.distill.form=top_k",
                "--engine",
                "streamed",
                *STREAMED,
            ],
            True,
            ["dump", "-o", "{tmp}/distill.safetensors", "--set", "source.teacher=perturbed"],
        ),
        (
            "batchfile",
            [*compare, "--set", "source.path={tmp}/batch.safetensors"],
            True,
            ["dump", "-o", "{tmp}/batch.safetensors", "--set", "source.rollout_drift=0.1"],
        ),
        (
            "batchfile_model",
            [
                *compare,
                "--set",
                "source.path={tmp}/batch.safetensors",
                "--set",
                "source.model_path=builtin",
                *MODEL_PASS,
            ],
            True,
            [
                "dump",
                "-o",
                "{tmp}/batch.safetensors",
                "-c",
                str(CONFIGS / "model_builtin.yaml"),
                *MODEL_PASS,
            ],
        ),
    ]
    return out
