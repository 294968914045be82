"""The fused engine's Triton kernels against the streamed engine and autograd.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1: the same kernel
code, evaluated tile by tile in numpy on the CPU), so these tests check the kernels' logic —
indexing, masking of partial tiles, the online logsumexp, the folded sampled-row correction,
the per-loss reductions — at small shapes. They skip when Triton is not installed. The `gpu`
test runs the compiled kernels on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_batch
from torch import Tensor

from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.diagnostics import tolerances
from gradlens.diagnostics.streamed import zero_sum_streamed
from gradlens.engine import fused, fused_kernels
from gradlens.engine.fused import check_device, fused_lm_head_pass
from gradlens.engine.fused_kernels import Blocks
from gradlens.engine.streamed import EnginePlan, EngineResult, dense_dtype, lm_head_pass
from gradlens.errors import GradlensError
from gradlens.grads import (
    SoftmaxView,
    autograd_reference,
    objective,
    on_grid,
    softmax_view,
    token_inputs,
)
from gradlens.losses import Aggregation, LossParams, aggregation_weights, get_loss

PARAMS = LossParams(eps_high=0.1, eps_low=0.1)  # narrow clip: ppo_clip differs from ppo often
# Tiles for M = 165 tokens, H = 48 (each capped at the power of 2 covering its dimension):
# every kernel sees a partial last tile of tokens and of hidden columns (48 = 32 + 16) and, with
# chunks of 333, 700 or 1000 rows, of vocabulary columns and rows. The interpreter runs programs
# and tiles as a Python loop: LARGE keeps them few; SMALL has several per chunk.
LARGE = Blocks(token_rows=64, vocab_cols=1024, vocab_rows=64, hidden_cols=32)
SMALL = Blocks(token_rows=32, vocab_cols=64, vocab_rows=16, hidden_cols=32)


@pytest.fixture
def interpreter():
    """Triton installed and in interpreter mode (tests/conftest.py asks for it without CUDA)."""
    pytest.importorskip("triton")
    if not fused_kernels.INTERPRETING:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 (compiled kernels only)")


def problem(dtype: torch.dtype, vocab: int, names: list[str], device: str = "cpu"):
    """The synthetic batch (8 sequences of up to 24 tokens: M = 165, H = 48) and its coefficient
    function: the losses ``names`` with token_mean, as `compare` runs them."""
    source = {"vocab_size": vocab, "num_sequences": 8, "max_length": 24, "hidden_size": 48}
    cfg = validate({"source": source})
    batch = build_batch(cfg, torch.device(device), dtype)
    view = softmax_view(batch)

    def coefficients(logp: Tensor) -> list[Tensor]:
        grid = torch.zeros(batch.mask.shape, dtype=logp.dtype, device=logp.device)
        grid[view.rows, view.cols] = logp
        inp = token_inputs(batch, grid)
        w = aggregation_weights(batch.mask, "token_mean", None, logp.dtype)
        grads = [w * get_loss(n).fn(inp, PARAMS).per_token_grad for n in names]
        return [g[view.rows, view.cols] for g in grads]

    return batch, view, coefficients


def bonus_weight(batch: Batch, view: SoftmaxView, c_h: float) -> Tensor | None:
    """w_t = a_t·c_H of the entropy bonus (None without it)."""
    if c_h == 0.0:
        return None
    a = aggregation_weights(batch.mask, "token_mean", None, view.logp.dtype)
    return c_h * a[view.rows, view.cols]


def run_both(batch, view, coefficients, engine_plan, blocks, entropy_weight, entropy_losses):
    args = (view.hidden, batch.weight, view.tokens, coefficients, engine_plan)
    kw = {"entropy_weight": entropy_weight, "entropy_losses": entropy_losses}
    return lm_head_pass(*args, **kw), fused_lm_head_pass(*args, **kw, blocks=blocks)


def assert_within(name: str, got: Tensor | None, want: Tensor | None, tol: Tensor) -> None:
    assert got is not None and want is not None, name
    excess = (got.double() - want.double()).abs() - tol.double()
    assert float(excess.max()) <= 0.0, f"{name}: exceeds its tolerance by {float(excess.max())}"


def check_against_streamed(
    batch: Batch,
    view: SoftmaxView,
    ref: EngineResult,
    res: EngineResult,
    entropy_weight: Tensor | None,
    n_bonus: int,
) -> None:
    """Every field of the fused result against the streamed one, each within a bound derived
    from how both compute it in float32 (u = 2⁻²⁴, its unit roundoff; with bf16 operands only
    the GEMMs differ, see the row norms).

    ε_t = 2u(1 + 2·max_v|z_tv| + 2·log2 V) bounds the relative error of every
    π_tv = exp((z_tv − m_t) − log S_t) in either path: z − m rounds by u·|z − m| ≤ 2u·max|z|,
    subtracting fl(log S) by u·(|z − m| + log S) more, fl(log S) itself by u·log S (S is a
    float64 sum: its own rounding is ~2⁻⁴⁸ relative), and exp by 2 ulp, 4u: in all at most
    u·(4·max|z| + 2·ln V + 4) ≤ ε_t. Both paths start from the same float32 logits (the same
    GEMM on the same operands) and the same exact m.
    """
    u = tolerances.unit_roundoff(torch.float32)
    v, m, h = batch.vocab_size, view.hidden.shape[0], view.hidden.shape[1]
    t_ref, t_res = ref.tokens, res.tokens
    eps = 2 * u * (1 + 2 * t_ref.max_abs_logit.double() + 2 * math.log2(v))  # [M] ε_t
    # each path within ε_t/2 of the exact lse (hence logp, z_y being exact): ε_t for the two
    assert_within("lse", t_res.lse, t_ref.lse, eps)
    assert_within("logp", t_res.logp, t_ref.logp, eps)
    # Σ_v π: each π relative ε, Σ π ≈ 1 — ε per path, 2ε between them
    assert_within("prob_sum", t_res.prob_sum, t_ref.prob_sum, 2 * eps)
    # H = Σ π_v ℓ_v (ℓ = lse − z ≥ 0): |Δπ_v|·ℓ_v + π_v·|Δℓ_v| ≤ ε·π_v(ℓ_v + 1) per path
    assert_within("entropy", t_res.entropy, t_ref.entropy, 2 * eps * (1 + t_ref.entropy.double()))
    assert_within(
        "max_other_prob", t_res.max_other_prob, t_ref.max_other_prob, 2 * eps * t_ref.max_other_prob
    )
    # the same logits, and |·| and max are exact
    assert torch.equal(t_res.max_abs_logit, t_ref.max_abs_logit)
    assert res.gemm_equivalents == ref.gemm_equivalents  # the same GEMMs, counted the same way

    # c_t depends on ℓ through r = e^{ℓ − ℓ_old}: relative error |Δℓ| + a few u ≤ 2ε; a clip
    # mask (at r = 1 ± 0.1) could flip only for a token within r·2ε of a bound: none is, which
    # this premise checks (a new batch that broke it would need another seed, not a new bound)
    r = (view.logp[view.rows, view.cols] - batch.old_logp[view.rows, view.cols]).exp()
    to_bound = ((r - 1).abs() - PARAMS.eps_high).abs()  # eps_low = eps_high
    assert bool((to_bound > 2 * r * 2 * eps).all()), "a token sits on a clip bound"
    cmax = torch.zeros(m, dtype=torch.float64, device=view.hidden.device)
    for i, (a, b) in enumerate(zip(res.coefficients, ref.coefficients, strict=True)):
        assert_within(f"c[{i}]", a, b, 2 * eps * b.double().abs())
        cmax = torch.maximum(cmax, b.double().abs())

    # Row norms. Row v = Σ_t g_tv h_t with g = c(e_y − π) (+ E with the bonus). Each path's
    # g_tv is within 2ε + 3u relative of the exact one (π, c, the product), its GEMM adds at most
    # γ_M = M·u of Σ_t |g_tv|‖h_t‖ and the norm γ_H = H·u. A shared product (ppo_clip from ppo)
    # forms g from c_j and c_k − c_j, at most 3·max_i |c_i| in size: so per row
    #     |ΔN_v| ≤ 2·(2ε + (M + H + 3)·u)·gross_v,
    #     gross_v = Σ_t ‖h_t‖·(3·max_i|c_it|·([y_t = v] + π_tv) + |w_t|·π_tv(|log π_tv| + H_t + 1)).
    hd = view.hidden.double()
    logp_all = torch.log_softmax((hd @ batch.weight.double().T), -1)  # [M, V], float64
    pi = logp_all.exp()
    onehot = torch.zeros_like(pi).scatter_(-1, view.tokens[:, None], 1.0)
    size = 3 * cmax[:, None] * (onehot + pi)  # [M, V]
    entropy = t_ref.entropy.double()
    if entropy_weight is not None:
        ew = entropy_weight.double().abs()[:, None]
        size_bonus = size + ew * pi * (logp_all.abs() + entropy[:, None] + 1)
    gross = size.T @ hd.norm(dim=1)  # [V]
    gross_bonus = size_bonus.T @ hd.norm(dim=1) if entropy_weight is not None else gross
    factor = 2 * (2 * float(eps.max()) + (m + h + 3) * u)
    dense = dense_dtype(view.hidden.dtype)
    if dense != torch.float32:
        # bf16 operands: each path rounds its GEMM operands (π or π − e_y, c⊙h, E) and its GEMM
        # output once each to bf16: 3·u_bf16 of gross_v more per path
        factor += 2 * 3 * tolerances.unit_roundoff(dense)
    for i, (a, b) in enumerate(zip(res.rows, ref.rows, strict=True)):
        assert_within(
            f"norms[{i}]", a.norms, b.norms, factor * (gross_bonus if i < n_bonus else gross)
        )

    # Row sums, Σ_v π and Σ_v E are zero up to rounding: both paths must pass the engine's own
    # zero-sum check (`zero_sum_streamed`, the tolerances of `tolerances` with their reasons).
    hidden_norms = view.hidden.float().norm(dim=-1)
    for i in range(len(res.rows)):
        for out in (ref, res):
            bonus_scale = None
            if entropy_weight is not None and i < n_bonus:
                bonus_scale = 2 * entropy_weight.abs() * out.tokens.entropy
            verdict = zero_sum_streamed(
                out.coefficients[i],
                out.tokens,
                out.rows[i].row_sum,
                out.rows[i].norms,
                hidden_norms,
                v,
                dense,
                other_max=out.rows[i].other_max,
                bonus_scale=bonus_scale,
                gemm_scale=out.rows[i].gemm_scale,
            )
            assert verdict.passed, (i, verdict)

    if entropy_weight is None:
        assert t_res.entropy_grad_at_y is None and t_res.entropy_grad_sum is None
        assert all(r.other_mass is None and r.other_max is None for r in res.rows)
        return
    # The bonus E_v = w·π_v(log π_v + H): per path |ΔE_v| ≤ ε|w|π_v(|log π_v| + 3H + 3) (π relative
    # ε, log π absolute ε, H absolute 2ε(1 + H)); summed over v (Σπ ≤ 1, Σ π|log π| = H):
    # ε|w|(4H + 3). The per-loss |E_v − c_i π_v| adds 2ε|c_i|π_v.
    w = entropy_weight.double().abs()
    e_sum = eps * w * (4 * entropy + 3)
    assert_within("entropy_grad_sum", t_res.entropy_grad_sum, t_ref.entropy_grad_sum, 2 * e_sum)
    ly = t_ref.logp.double()
    e_y = eps * w * (ly.abs() * ly.exp() + 3 * entropy + 3)
    assert_within("entropy_grad_at_y", t_res.entropy_grad_at_y, t_ref.entropy_grad_at_y, 2 * e_y)
    for i, (a, b) in enumerate(zip(res.rows, ref.rows, strict=True)):
        if i >= n_bonus:
            assert a.other_mass is None and a.other_max is None
            continue
        c = ref.coefficients[i].double().abs()
        tol = 2 * (e_sum + 2 * eps * c)
        assert_within(f"other_mass[{i}]", a.other_mass, b.other_mass, tol)
        assert_within(f"other_max[{i}]", a.other_max, b.other_max, tol)


CASES = [
    # (vocab, plan, blocks, losses, c_H, losses carrying the bonus)
    (300, EnginePlan(vocab_chunk=512, resident=1), LARGE, ["ppo"], 0.0, None),
    (1500, EnginePlan(vocab_chunk=256, resident=0), LARGE, ["reinforce", "sft"], 0.0, None),
    (700, EnginePlan(vocab_chunk=256, resident=1), SMALL, ["reinforce", "ppo", "ppo_clip"], 0.0,
     None),
    (3000, EnginePlan(vocab_chunk=1000, resident=1), LARGE, ["reinforce", "ppo", "ppo_clip"], 0.0,
     None),
    (300, EnginePlan(vocab_chunk=128, resident=1), SMALL, ["ppo"], 0.1, None),
    (1500, EnginePlan(vocab_chunk=333, resident=2), LARGE, ["reinforce", "ppo", "ppo_clip"], 0.01,
     2),
]  # fmt: skip
IDS = [
    "V300-one-chunk-k1",
    "V1500-streamed-k2",
    "V700-small-blocks-k3-shared",
    "V3000-k3-shared",
    "V300-bonus-k1",
    "V1500-bonus-k3-shared-two-carry-it",
]


# Triton's interpreter takes seconds per case on the CPU: the first case alone is fast.
@pytest.mark.parametrize(
    ("vocab", "engine_plan", "blocks", "names", "c_h", "n_bonus"),
    [
        pytest.param(*case, id=name, marks=[] if i == 0 else [pytest.mark.slow])
        for i, (case, name) in enumerate(zip(CASES, IDS, strict=True))
    ],
)
def test_float32_fused_equals_the_streamed_engine(
    interpreter, monkeypatch, vocab, engine_plan, blocks, names, c_h, n_bonus
):
    monkeypatch.setattr(fused, "TOKEN_BLOCK", 64)  # c⊙h in 3 token blocks, as at real sizes
    batch, view, coefficients = problem(torch.float32, vocab, names)
    entropy_weight = bonus_weight(batch, view, c_h)
    ref, res = run_both(batch, view, coefficients, engine_plan, blocks, entropy_weight, n_bonus)
    if "ppo_clip" in names:  # the shared-product path is exercised: ppo_clip reuses ppo's GEMM
        clipped = float((ref.coefficients[2] != ref.coefficients[1]).double().mean())
        assert 0 < clipped < 0.5
    carried = 0 if entropy_weight is None else (len(names) if n_bonus is None else n_bonus)
    check_against_streamed(batch, view, ref, res, entropy_weight, carried)


def test_row_norms_of_rows_whose_squares_underflow_are_not_zero(interpreter):
    # h·1e-22: every ∂L/∂W entry lies below 1e-19, whose square is below float32's normal
    # range; the kernel's float32 sum of squares gives 0 or a few bits, and the rows outside
    # the safe range are recomputed (gradlens/engine/norms.py), as the streamed engine does
    batch, view, coefficients = problem(torch.float32, 300, ["reinforce", "sft"])
    view = dataclasses.replace(view, hidden=view.hidden * 1e-22)
    plan = EnginePlan(vocab_chunk=128, resident=0)
    ref, res = run_both(batch, view, coefficients, plan, SMALL, None, None)
    for r, f in zip(ref.rows, res.rows, strict=True):
        assert bool((r.norms > 0).all()) and bool((f.norms > 0).all())
        assert float(((f.norms.double() - r.norms.double()).abs() / r.norms.double()).max()) < 1e-5


@pytest.mark.slow
def test_bf16_operands_fused_equals_the_streamed_engine(interpreter):
    """bf16 h and W, as on a GPU: the GEMM operands P = π − e_y, c⊙h and E in bf16, everything
    else in float32 (the interpreter emulates bf16 storage)."""
    names = ["reinforce", "ppo", "ppo_clip"]
    batch, view, coefficients = problem(torch.bfloat16, 1500, names)
    entropy_weight = bonus_weight(batch, view, 0.1)
    engine_plan = EnginePlan(vocab_chunk=333, resident=2)
    ref, res = run_both(batch, view, coefficients, engine_plan, LARGE, entropy_weight, None)
    check_against_streamed(batch, view, ref, res, entropy_weight, len(names))


@pytest.mark.parametrize("c_h", [pytest.param(0.0, marks=pytest.mark.slow), 0.1])  # 0.1 does both
def test_float64_fused_equals_autograd(interpreter, c_h):
    """The kernels' maths, independently of the streamed engine: float64 against autograd."""
    names = ["reinforce", "ppo", "ppo_clip", "sft"]
    batch, view, coefficients = problem(torch.float64, 700, names)
    entropy_weight = bonus_weight(batch, view, c_h)
    res = fused_lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        coefficients,
        EnginePlan(vocab_chunk=333, resident=1),
        entropy_weight=entropy_weight,
        blocks=LARGE,
    )
    params = dataclasses.replace(PARAMS, entropy_coef=c_h)
    tol = tolerances.agreement(torch.float64)  # 1e-9: the closed form vs autograd in float64
    lse = torch.logsumexp(view.hidden @ batch.weight.T, -1)
    assert torch.allclose(res.tokens.lse, lse, rtol=0, atol=tol)
    assert torch.allclose(res.tokens.logp, view.logp[view.rows, view.cols], rtol=0, atol=tol)
    assert torch.allclose(res.tokens.entropy, view.entropy, rtol=0, atol=tol)
    for name, rows in zip(names, res.rows, strict=True):
        ref = autograd_reference(batch, get_loss(name), params, Aggregation())
        grad_w = ref.grad_weight
        scale = float(grad_w.abs().max())
        assert float((rows.norms - grad_w.norm(dim=1)).abs().max()) <= tol * scale, name
        assert float((rows.row_sum - grad_w.sum(0)).abs().max()) <= tol * scale, name
        if c_h:
            assert rows.other_mass is not None and rows.other_max is not None
            other = ref.grad_logits.scatter(-1, view.tokens[:, None], 0.0).abs()  # v ≠ y
            assert torch.allclose(rows.other_mass, other.sum(-1), rtol=tol, atol=0), name
            assert torch.allclose(rows.other_max, other.amax(-1), rtol=tol, atol=0), name


def test_blocks_must_be_powers_of_two():
    with pytest.raises(GradlensError, match=r"blocks\.vocab_cols: 100 is not a power of 2"):
        Blocks(vocab_cols=100)


def test_without_triton_the_fused_engine_names_the_extra(monkeypatch):
    monkeypatch.setattr(fused_kernels, "AVAILABLE", False)
    with pytest.raises(GradlensError, match=r"Triton is not installed.*gradlens\[gpu\]"):
        check_device(torch.device("cpu"))


def test_on_cpu_the_kernels_run_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(fused_kernels, "AVAILABLE", True)
    monkeypatch.setattr(fused_kernels, "INTERPRETING", False)
    with pytest.raises(GradlensError, match="run on CUDA, not on device 'cpu'"):
        check_device(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c_h", [0.0, 0.1])
def test_compiled_kernels_on_cuda_equal_the_streamed_engine(dtype, c_h):
    """The compiled kernels (not the interpreter) against the streamed engine on the GPU."""
    pytest.importorskip("triton")
    names = ["reinforce", "ppo", "ppo_clip"]
    batch, view, coefficients = problem(dtype, 5000, names, device="cuda")
    entropy_weight = bonus_weight(batch, view, c_h)
    ref, res = run_both(
        batch, view, coefficients, EnginePlan(vocab_chunk=1024, resident=2), Blocks(),
        entropy_weight, None,
    )  # fmt: skip
    check_against_streamed(batch, view, ref, res, entropy_weight, 0 if c_h == 0.0 else 3)


@pytest.mark.slow
def test_every_kernel_compiles_for_a_gpu_without_one(tmp_path):
    """The compiled path's language rules, which the interpreter does not enforce: every
    variant the engine launches compiles to an sm_90 cubin (tests/engine/compile_kernels.py)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile now, not from an earlier run's cache
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run(
        [sys.executable, str(script), "90"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [line for line in done.stdout.splitlines() if line.endswith(": compiled")]
    assert len(compiled) == 3 * 2 * 3  # 3 kernels × 2 flag values × 3 operand dtypes


@pytest.mark.slow
@pytest.mark.parametrize("c_h", [0.0, 0.1])
def test_float64_fused_hands_pass_one_entropies_to_the_losses(interpreter, c_h):
    """``token_entropy``: the kernels' pass-1 H_t reaches the losses (the top-entropy selection
    at ρ = 0.4 and aspo, whose widths depend on H_t) and the bonus's weight c_H·a_t·S_t, a
    function of it; float64 against autograd."""
    names = ["ppo_clip", "aspo"]
    batch, view, _ = problem(torch.float64, 700, names)
    params = dataclasses.replace(PARAMS, top_entropy_quantile=0.4, entropy_coef=c_h)
    seen: list[Tensor] = []

    def coefficients(logp: Tensor, entropy: Tensor) -> list[Tensor]:
        seen.append(entropy)
        grid = on_grid(logp, view.rows, view.cols, batch.mask.shape)
        h = on_grid(entropy, view.rows, view.cols, batch.mask.shape)
        objs = [objective(batch, grid, get_loss(n), params, Aggregation(), h) for n in names]
        return [o.coefficient[view.rows, view.cols] for o in objs]

    a = aggregation_weights(batch.mask, "token_mean", None, torch.float64)[view.rows, view.cols]

    def bonus(entropy: Tensor) -> Tensor:  # c_H·a_t·S_t from the same H_t
        keep = entropy >= torch.quantile(entropy, 1 - params.top_entropy_quantile)
        return c_h * a * keep.to(a.dtype)

    res = fused_lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        coefficients,
        EnginePlan(vocab_chunk=333, resident=1),
        entropy_weight=bonus if c_h else None,
        blocks=LARGE,
        token_entropy=True,
    )
    tol = tolerances.agreement(torch.float64)  # 1e-9: the closed form vs autograd in float64
    assert len(seen) == 1 and torch.allclose(seen[0], view.entropy, rtol=0, atol=tol)
    for name, rows in zip(names, res.rows, strict=True):
        ref = autograd_reference(batch, get_loss(name), params, Aggregation())
        grad_w = ref.grad_weight
        scale = float(grad_w.abs().max())
        assert float((rows.norms - grad_w.norm(dim=1)).abs().max()) <= tol * scale, name
