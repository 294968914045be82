"""The zero-sum check at real vocabulary sizes: V = 32,768 to 262,144, both engines, every dtype.

The lm_heads here are tiled: the rows of a small random [V0, H] matrix repeated to V rows (V0 =
1000 does not divide V, so the last copy is partial). Repeated logits round alike in every copy,
so a sum whose order lets roundings pile up shows it at its worst: torch's CPU log_softmax,
which adds a row's exponentials in one SIMD accumulator whose lanes each add V/lanes terms in
sequence, put these batches' zero-sum residual at 1.2 to 1.6 times the previous bound at
V = 262,144 (materialized, every dtype), and the streamed engine's anywhere from 0.1 to 1.3
times it depending on the chunk size. gradlens now normalises π itself (float64 sums in a fixed
order, `gradlens.logits`), and the bound of `gradlens.diagnostics.tolerances` describes that
computation, on both engines and for every chunk size; these tests hold it to that, and show
that a loss that is not zero-sum still fails — with the AVX2 kernels the suite pins
(tests/cpu_kernels.py) and, in a process of their own, with the machine's own.

The logit scale 3 (z ~ N(0, 9)) is that of a trained LM's head rather than of a random
initialisation (z ≈ 0.1, a near-uniform π on which nothing rounds).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_kernels import own_kernels_env
from helpers import gradients, make_batch

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.zero_sum import judge, zero_sum
from gradlens.engine.streamed import EnginePlan, dense_dtype, lm_head_pass
from gradlens.grads import softmax_view
from gradlens.losses import LossParams
from gradlens.results import CompareReport

PURE = ["reinforce", "sft", "ppo_clip"]  # pure softmax losses: c_t·(e_y − π)
DTYPES = ["float32", "bfloat16", "float64"]
V0, HIDDEN, SCALE = 1000, 16, 3.0
SEQUENCES, LENGTH = 2, 3  # 6 tokens: the cost is in V, not in M
# (engine, vocab_chunk): one chunk size that divides nothing, a power of two, and the largest;
# the fused engine's kernels (under Triton's interpreter without CUDA) with the odd chunk size
ENGINES = [
    ("materialized", None),
    ("streamed", 777),
    ("streamed", 8192),
    pytest.param("fused", 777, marks=pytest.mark.slow),  # the interpreter over 32k: minutes
]
SLOW_ENGINES = [("materialized", None), ("streamed", 256), ("streamed", 4096), ("streamed", 65536)]
# A z-loss λ·lse_t² per token (aggregated like the loss, a_t = 1/M), λ = 1e-4 as PaLM and OLMo 2
# train with, and ten times less: it adds 2λ·a_t·lse_t·π_t to the logit gradient, so Σ_v G_t
# moves by 2λ·a_t·lse_t ≈ 2λ·a_t·(ln V + 4.5) (lse of N(0, 9) logits over V entries).
Z_LOSS = [1e-4, 1e-5]


def tiled_tensors(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of tiled-lm_head tensors in float64: [N, T] tokens, mask, advantages of both
    signs, log π_old with a drift that makes ppo_clip clip some tokens; [N, T, H] hidden states
    and the [V, H] weight."""
    gen = torch.Generator().manual_seed(seed)
    block = SCALE * torch.randn(V0, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5
    weight = block.repeat(-(-vocab // V0), 1)[:vocab]  # [V, H]
    hidden = torch.randn(SEQUENCES, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=gen)
    advantages = torch.tensor([[1.3], [-0.7]], dtype=torch.float64).expand(-1, LENGTH)
    return {
        "hidden_states": hidden,
        "lm_head_weight": weight,
        "responses": tokens,
        "response_mask": torch.ones(SEQUENCES, LENGTH, dtype=torch.int64),
        "advantages": advantages.contiguous(),
        "drift": 0.5 * torch.randn(SEQUENCES, LENGTH, generator=gen, dtype=torch.float64),
    }


class BatchFiles:
    """vocab → a .safetensors batch file of `tiled_tensors`, written on first use; π_old is
    π_θ·e^−drift from the float64 logits."""

    def __init__(self, root: Path) -> None:
        self.root, self.files = root, dict[int, Path]()

    def __getitem__(self, vocab: int) -> Path:
        from safetensors.torch import save_file

        if vocab not in self.files:
            t = tiled_tensors(vocab)
            logits = t["hidden_states"] @ t["lm_head_weight"].T  # [N, T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, t["responses"][..., None])[..., 0]
            t["old_log_probs"] = logp - t.pop("drift")
            self.files[vocab] = self.root / f"v{vocab}.safetensors"
            save_file({k: v.contiguous() for k, v in t.items()}, str(self.files[vocab]))
        return self.files[vocab]


@pytest.fixture(scope="module")
def batch_files(tmp_path_factory) -> BatchFiles:
    return BatchFiles(tmp_path_factory.mktemp("tiled"))


def compare(path: Path, dtype: str, engine: str, chunk: int | None) -> CompareReport:
    if engine == "fused":
        pytest.importorskip("triton")
    diagnostics: dict = {"engine": engine, "reference": "none"}
    if chunk is not None:
        diagnostics["vocab_chunk"] = chunk
    config = {
        "dtype": dtype,
        "losses": PURE,
        "source": {"kind": "batch", "path": str(path)},
        "diagnostics": diagnostics,
    }
    return run_compare(validate(config))


def assert_zero_sum_passes(report: CompareReport, vocab: int, dtype: str) -> None:
    accum = torch.float64 if dtype == "float64" else torch.float32
    expected = tolerances.zero_sum_logits(accum, vocab)
    for r in report.losses:
        z = r.zero_sum
        assert z.passed, (r.name, z)
        # the bound depends on V and the dtype only: not on the logits, the engine or the chunk
        assert z.logits_tolerance == expected
        # and it is not tight by luck: measured ≤ 0.05 of it on every case here
        assert z.logits_max_rel is not None and z.logits_max_rel <= expected / 4, (r.name, z)
    assert any(r.clipping.region for r in report.losses if r.name == "ppo_clip")


@pytest.mark.parametrize("engine, chunk", ENGINES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES)
def test_pure_softmax_losses_pass_at_32k(batch_files, dtype, engine, chunk):
    assert_zero_sum_passes(compare(batch_files[32_768], dtype, engine, chunk), 32_768, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("engine, chunk", SLOW_ENGINES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [131_072, 262_144])
def test_pure_softmax_losses_pass_at_large_vocabularies(batch_files, vocab, dtype, engine, chunk):
    assert_zero_sum_passes(compare(batch_files[vocab], dtype, engine, chunk), vocab, dtype)


@pytest.mark.slow
def test_the_streamed_residual_does_not_depend_on_the_chunk_size(batch_files):
    # float32: every float64 sum's rounding (~1e-16 relative, order-dependent) is far below the
    # float32 roundings of π, which do not depend on the chunking, so the residuals agree to
    # far better than 1 %; before, they moved with the chunk size (here 0.22 of the bound of the
    # time at chunks of 256 rows, 0.06 at 4,096).
    residuals = {
        chunk: [
            r.zero_sum.logits_max_rel
            for r in compare(batch_files[32_768], "float32", "streamed", chunk).losses
        ]
        for chunk in (256, 777, 32_768)
    }
    first = residuals[256]
    for values in residuals.values():
        assert values == pytest.approx(first, rel=1e-2)


# ----------------------------------------------------------------------------- able to fail


def tiled_batch(vocab: int, dtype: torch.dtype) -> Batch:
    t = tiled_tensors(vocab)
    return make_batch(
        t["hidden_states"].to(dtype),
        t["lm_head_weight"].to(dtype),
        t["responses"],
        t["response_mask"],
        advantages=t["advantages"],
    )


def z_loss_coefficient(batch: Batch, lam: float) -> torch.Tensor:
    """[M] c_z = −2λ·a_t·lse_t: the z-loss's logit gradient 2λ·a_t·lse_t·π_t is −c_z·π_t, the
    dense half of a c-form gradient without its sampled entry (a_t = 1/M, token_mean)."""
    view = softmax_view(batch)
    lse = torch.logsumexp(view.logits.double(), -1)  # [M]
    assert float(lse.min()) > math.log(batch.vocab_size)  # z-loss terms of one sign, ≥ ln V
    return -2 * lam * lse / lse.numel()


def materialized_verdict(batch: Batch, lam: float):
    view = softmax_view(batch)
    g = gradients(batch, "ppo_clip", LossParams())
    c = g.coefficient[batch.mask]  # [M]
    c_z = z_loss_coefficient(batch, lam).to(view.probs.dtype)
    bad = g.grad_logits - c_z[:, None] * view.probs  # [M, V] + 2λ·a·lse·π
    bad_weight = bad.T @ view.hidden.to(bad.dtype)  # [V, H]
    return zero_sum(bad, bad_weight, c, view.hidden, view.logits), c, c_z


def streamed_verdict(batch: Batch, lam: float, chunk: int):
    """The z-loss through the engine: c + c_z runs as one more c-form coefficient set, and its
    sampled entries −c_z·h_t come off the row sum; per token Σ_v G = c·(1 − Σπ) − c_z·Σπ from
    the engine's Σπ, with s_t as `zero_sum_streamed` forms it."""
    g = gradients(batch, "ppo_clip", LossParams())
    c = g.coefficient[batch.mask].float()  # [M]
    c_z = z_loss_coefficient(batch, lam).float()
    hidden = batch.hidden[batch.mask]  # [M, H]
    tokens = batch.tokens[batch.mask]
    res = lm_head_pass(hidden, batch.weight, tokens, lambda _: [c, c + c_z], EnginePlan(chunk, 0))
    stats, prob_sum = res.tokens, res.tokens.prob_sum
    sums = c.double() * (1 - prob_sum) - c_z.double() * prob_sum  # [M]
    largest = torch.maximum(1 - stats.sampled_prob.double(), stats.max_other_prob.double())
    row_sum = res.rows[1].row_sum - (c_z.double()[:, None] * hidden.double()).sum(0)  # [H]
    verdict = judge(
        sums=sums.abs(),
        scale=c.double().abs() * (1 + largest),
        row_sum=row_sum,
        total=res.rows[0].norms.double().norm(),
        hidden_norms=hidden.double().norm(dim=-1),
        accum=torch.float32,
        vocab=batch.vocab_size,
        max_abs_logit=float(stats.max_abs_logit.max()),
        finite=True,
        dense=dense_dtype(batch.hidden.dtype),
    )
    return verdict, c, c_z


def assert_fails(verdict, c: torch.Tensor, c_z: torch.Tensor) -> None:
    assert not verdict.passed
    assert verdict.logits_max_rel > verdict.logits_tolerance
    assert verdict.weight_rel > verdict.weight_tolerance
    # what the check reports is the z-loss's own Σ_v G_t = −c_z,t (float32 rounding aside)
    assert verdict.logits_max_abs == pytest.approx(float(c_z.abs().max()), rel=1e-3)
    # the smallest margin: the token where s_t ≈ 2|c_t| is largest against 2λ·a_t·lse_t
    margin = float((c_z.abs() / (2 * c.abs())).min()) / verdict.logits_tolerance
    assert margin > 2


@pytest.mark.parametrize("lam", Z_LOSS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_z_loss_fails_the_check_at_32k(lam, dtype):
    assert_fails(*materialized_verdict(tiled_batch(32_768, dtype), lam))


@pytest.mark.parametrize("lam", Z_LOSS)
def test_a_z_loss_fails_the_streamed_check_at_32k(lam):
    assert_fails(*streamed_verdict(tiled_batch(32_768, torch.float32), lam, 4096))


@pytest.mark.slow
@pytest.mark.parametrize("lam", Z_LOSS)
@pytest.mark.parametrize("vocab", [131_072, 262_144])
def test_a_z_loss_fails_the_check_at_large_vocabularies(vocab, lam):
    batch = tiled_batch(vocab, torch.float32)
    assert_fails(*materialized_verdict(batch, lam))
    assert_fails(*streamed_verdict(batch, lam, 4096))


# The cases above that run again with the machine's own kernels: every dtype and engine at 32k
# and at 262,144 (the Triton interpreter's fused engine aside: minutes), and the z-loss failures.
OWN_KERNEL_CASES = "(32k or (large_vocabularies and 262144)) and not fused"


@pytest.mark.slow
def test_the_bound_holds_with_the_machines_own_kernels():
    # The suite computes with the AVX2 kernels pinned in tests/cpu_kernels.py (for the golden
    # reports); a user's run takes the CPU's own: ATen's widest vector loops (AVX-512 where the
    # CPU has it), MKL's and oneDNN's native paths. The bound must hold, and a z-loss still
    # fail, with those too: the cases above run again in a process that sets them.
    env = own_kernels_env()
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(
        [*argv, "-k", OWN_KERNEL_CASES, "-W", "ignore"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # every selected case ran: at 32k each dtype on each engine but the fused one, the z-loss
    # on both engines (and in bf16); at 262,144 each dtype on each slow engine, one z-loss case
    engines = [getattr(e, "values", e) for e in ENGINES]  # a pytest.param holds its values
    unfused = [e for e in engines if e[0] != "fused"]
    expected = len(DTYPES) * (len(unfused) + len(SLOW_ENGINES)) + len(Z_LOSS) * (2 + 1 + 1)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{expected} passed") and "skipped" not in summary, (
        env["ATEN_CPU_CAPABILITY"],
        summary,
    )
