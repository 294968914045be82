"""The synthetic source above its materialized size (`gradlens.sources.synthetic_chunked`):
its log-probs against the same construction written out whole, the distribution of its tokens,
the invariants of the batch, reproducibility whatever the memory budget, and a Qwen-sized
vocabulary built without a [tokens, vocabulary] tensor."""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from helpers import build_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradlens.compare import run_compare
from gradlens.compare.run import source_context
from gradlens.config import SyntheticSource, validate
from gradlens.containers import Batch
from gradlens.grads import effective_old_logp, softmax_view
from gradlens.logits import token_logp
from gradlens.sources import synthetic, synthetic_chunked
from gradlens.sources.synthetic_calibration import ENTROPY_TOL, ROW_TILE, VOCAB_BLOCK, spans
from gradlens.sources.synthetic_chunked import ChunkedPolicies, build_chunked, stream

F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")
# 600 tokens × 5,000 vocabulary rows: 3 row tiles × 3 blocks, the last of each partial.
M, V, H = 600, 5000, 8
BASE: dict[str, Any] = {"vocab_size": V, "hidden_size": H}


def section(**source: Any) -> SyntheticSource:
    src = validate({"source": {**BASE, **source}}).source
    assert isinstance(src, SyntheticSource)
    return src


def chunked(
    dtype: torch.dtype = F64, seed: int = 0, budget: int = 1 << 30, **source: Any
) -> tuple[ChunkedPolicies, torch.Tensor, SyntheticSource]:
    """`build_chunked` on M seeded hidden states (as the source passes its valid tokens)."""
    src = section(**source)
    hidden = torch.randn(M, H, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return build_chunked(src, hidden.to(dtype), seed, budget), hidden.to(dtype), src


def whole(seed: int, kind: str, rows: int, cols: int, width: int | None = None) -> torch.Tensor:
    """The stream ``kind`` written out whole, in the order the construction draws it: per
    vocabulary block, [VOCAB_BLOCK, width] rows of W (``width``), or its tiles of tokens."""
    parts = []
    for b, (v0, v1) in enumerate(spans(cols, VOCAB_BLOCK)):
        gen = stream(seed, kind, b)
        if width is not None:
            parts.append(torch.randn(v1 - v0, width, generator=gen, dtype=F32))
        else:
            tiles = [
                torch.randn(r1 - r0, v1 - v0, generator=gen, dtype=F32)
                for r0, r1 in spans(rows, ROW_TILE)
            ]
            parts.append(torch.cat(tiles))
    return torch.cat(parts, dim=0 if width is not None else 1)


def materialized_logits(
    built: ChunkedPolicies, hidden: torch.Tensor, src: SyntheticSource, seed: int
) -> dict[str, torch.Tensor]:
    """Every policy's [M, V] logits of the chunked construction (float64 operands), whole:
    W0 and each ε from the same streams, then the formulas of the module docstring."""
    c = built.scale
    w0 = whole(seed, "weight", M, V, width=H).double()
    z = c * (hidden @ w0.T)  # z = c·z⁰
    logits = {"theta": z, "old": z}
    drift = src.drift
    if drift.kind == "logit_noise":
        logits["old"] = z + drift.scale * whole(seed, "logit_noise", M, V).double()
    elif drift.kind == "stale_weight":
        std_w = c * float(w0.std())
        eps = whole(seed, "stale", M, V, width=H).double()
        logits["old"] = hidden @ (w0 * c + drift.scale * std_w * eps).T
    if src.rollout_drift is not None:
        noise = whole(seed, "rollout", M, V).double()
        logits["rollout"] = logits["old"] + src.rollout_drift * noise
    if src.ref_drift is not None:
        logits["ref"] = z + src.ref_drift * whole(seed, "ref", M, V).double()
    return logits


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of the sample ``u`` from U(0, 1)."""
    x, _ = torch.sort(u.double())
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=F64)
    return float(torch.maximum(i / n - x, x - (i - 1) / n).max())


def pit(
    probs: torch.Tensor, tokens: torch.Tensor, gen: torch.Generator, ranked: bool = False
) -> torch.Tensor:
    """Randomised probability integral transform F(y − 1) + U·π(y), with the vocabulary in index
    order or (``ranked``) each row's entries from most to least likely: U(0, 1) exactly when
    each y_t is drawn from its row of ``probs`` [M, V]. The ranked order puts the mass a wrong
    temperature moves (between the likely head and the tail) at the two ends."""
    probs = probs.double()
    if ranked:
        probs, order = probs.sort(dim=-1, descending=True)
        tokens = (order == tokens[:, None]).to(torch.int64).argmax(-1)  # y's rank
    cdf = probs.cumsum(-1)
    p_y = probs.gather(-1, tokens[:, None]).squeeze(-1)
    below = cdf.gather(-1, tokens[:, None]).squeeze(-1) - p_y
    return below + torch.rand(tokens.shape, generator=gen, dtype=F64) * p_y


def ks_bound(n: int) -> float:
    # P(√n·D_n > 1.95) ≈ 0.001 for n uniform draws (Kolmogorov's limit distribution); the
    # seeds are fixed, so this is the chance that a correct sampler had been caught by them.
    return 1.95 / math.sqrt(n)


DRIFTS = [
    {"drift": {"kind": "none"}},
    {"drift": {"kind": "logit_noise", "scale": 0.5}},
    {"drift": {"kind": "stale_weight", "scale": 0.3}},
    {"drift": {"kind": "logit_noise", "scale": 0.5}, "rollout_drift": 0.2, "ref_drift": 0.4},
    {"drift": {"kind": "stale_weight", "scale": 0.3}, "rollout_drift": 0.2, "ref_drift": 0.4},
]


@pytest.mark.slow
@pytest.mark.parametrize("source", DRIFTS, ids=lambda s: "-".join(map(str, s)))
def test_log_probs_are_those_of_the_construction_written_out(source: dict[str, Any]) -> None:
    # Float64: the chunked log-probs (block maxima and sums combined in float64, z_y kept with
    # the winning candidate) and log_softmax over the whole [M, V] logits of the same W0 and ε
    # differ only by rounding, ~1e-15·|z| (1e-12 leaves room for |z| ≲ 100 and 5,000 terms).
    built, hidden, src = chunked(seed=3, **source)
    logits = materialized_logits(built, hidden, src, seed=3)
    assert torch.equal(built.weight, (whole(3, "weight", M, V, width=H).double() * built.scale))
    for name, logp in (
        ("old", built.old_logp),
        ("rollout", built.rollout_logp),
        ("ref", built.ref_logp),
    ):
        if name not in logits:
            assert logp is None
            continue
        assert logp is not None and logp.dtype == F64
        want = token_logp(logits[name], built.tokens)
        assert float((logp - want).abs().max()) <= 1e-12, name


@pytest.mark.slow
@pytest.mark.parametrize("entropy", [0.5, pytest.param(3.0, marks=pytest.mark.slow)])
def test_tokens_are_drawn_from_the_sampler(entropy: float) -> None:
    # y ~ μ_old = softmax(z_old + rollout noise): the randomised PIT of 2,400 tokens (4 seeds)
    # under μ_old is uniform within the KS bound, in index order (which a wrong choice of block,
    # a contiguous range, would break) and in rank order. The same tokens judged against
    # softmax(1.3·z_μ) (a wrong temperature) or π_old (without the rollout noise of 1 nat) are
    # not: the test can tell a wrong sampler.
    source = {"entropy": entropy, "drift": {"kind": "logit_noise"}, "rollout_drift": 1.0}
    u: dict[str, list[torch.Tensor]] = {"index": [], "rank": [], "hot": [], "old": []}
    gen = torch.Generator().manual_seed(0)
    for seed in range(4):
        built, hidden, src = chunked(seed=seed, **source)
        logits = materialized_logits(built, hidden, src, seed)
        probs = torch.softmax(logits["rollout"], -1)
        u["index"].append(pit(probs, built.tokens, gen))
        u["rank"].append(pit(probs, built.tokens, gen, ranked=True))
        hot = torch.softmax(1.3 * logits["rollout"], -1)
        u["hot"].append(pit(hot, built.tokens, gen, ranked=True))
        u["old"].append(pit(torch.softmax(logits["old"], -1), built.tokens, gen, ranked=True))
    d = {name: ks_uniform(torch.cat(values)) for name, values in u.items()}
    bound = ks_bound(4 * M)
    assert d["index"] < bound and d["rank"] < bound, d
    assert d["hot"] > bound and d["old"] > bound, d


@pytest.fixture
def chunk_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every synthetic batch through the chunked construction."""
    monkeypatch.setattr(synthetic, "MATERIALIZE_ENTRIES", 0)


def synthetic_batch(dtype: torch.dtype = F64, seed: int = 0, **source: Any) -> Batch:
    """12 sequences of 16–64 tokens (~480 valid) at V = 5,000: N·T·V = 3.9M, just within the
    materialized construction's threshold, so both constructions can build it."""
    config = validate(
        {"seed": seed, "source": {"num_sequences": 12, "vocab_size": V, "hidden_size": H, **source}}
    )
    return build_batch(config, CPU, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["materialized", "chunked"])
def test_both_constructions_draw_tokens_from_pi_theta(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Drift none, no rollout drift: each construction samples y ~ π_θ of its own batch, which
    # the engine's softmax recomputes from the batch's h and W. Randomised PIT (rank order) over
    # 4 seeds of ~480 tokens each, against the KS bound of that many tokens.
    if path == "chunked":
        monkeypatch.setattr(synthetic, "MATERIALIZE_ENTRIES", 0)
    gen = torch.Generator().manual_seed(1)
    us = []
    for seed in range(4):
        batch = synthetic_batch(seed=seed, entropy=2.0, drift={"kind": "none"})
        assert ("built in blocks" in batch.source) == (path == "chunked")
        view = softmax_view(batch)
        us.append(pit(view.probs, view.tokens, gen, ranked=True))
    u = torch.cat(us)
    assert ks_uniform(u) < ks_bound(u.numel())


@pytest.mark.slow
@pytest.mark.usefixtures("chunk_everything")
@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("source", DRIFTS, ids=lambda s: "-".join(map(str, s)))
def test_chunked_batch_invariants(dtype: torch.dtype, source: dict[str, Any]) -> None:
    batch = synthetic_batch(dtype, seed=5, **source)
    m = batch.mask
    acc = F64 if dtype == F64 else F32
    assert batch.weight.dtype == batch.hidden.dtype == dtype
    assert batch.old_logp.dtype == batch.advantages.dtype == acc
    for logp in (batch.old_logp, batch.rollout_logp, batch.ref_logp):
        if logp is not None:  # ≤ 0 exactly (module docstring, 5.), zero at padding
            assert bool((logp[m] <= 0).all()) and bool((logp[~m] == 0).all())
    assert bool(((batch.tokens >= 0) & (batch.tokens < V)).all())
    assert bool((batch.tokens[~m] == 0).all())
    assert batch.on_policy is not None
    assert torch.equal(batch.on_policy, m & (source["drift"]["kind"] == "none"))
    adv = batch.advantages
    assert bool((adv[~m] == 0).all()) and bool(((adv == adv[:, :1]) | ~m).all())


@pytest.mark.slow
@pytest.mark.usefixtures("chunk_everything")
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("target", [0.3, 2.5])
def test_chunked_batch_hits_the_entropy_target(dtype: torch.dtype, target: float) -> None:
    # The calibration stops within ENTROPY_TOL = 1e-6 as it evaluates H̄ (float32 terms: ~1e-7
    # more); the engine then recomputes π from W rounded to the operand dtype, which moves each
    # float32 logit by ~2⁻²⁴·Σ_k |h_k W_vk| ≲ 1e-6 and the entropy by about that times
    # E|log π + H| ≈ 1-3: within 1e-5 in all. A wrong scale misses by far more than 1e-3.
    batch = synthetic_batch(dtype, seed=2, entropy=target)
    entropy = float(softmax_view(batch).entropy.mean())
    assert entropy == pytest.approx(target, abs=1e-5 if dtype == F32 else 2 * ENTROPY_TOL)


@pytest.mark.slow
@pytest.mark.usefixtures("chunk_everything")
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_chunked_drift_none_is_on_policy(dtype: torch.dtype) -> None:
    # Drift none: every valid position on-policy, so r = 1 exactly. In float64 the stored ℓ_old
    # (z = c·z⁰) is also the engine's ℓ (z = h·Wᵀ) to rounding: |Δz| ~ 1e-16·|z|.
    batch = synthetic_batch(dtype, seed=4, drift={"kind": "none"})
    view = softmax_view(batch)
    m = batch.mask
    assert torch.equal(effective_old_logp(batch, view.logp)[m], view.logp[m])
    if dtype == F64:
        assert float((batch.old_logp - view.logp)[m].abs().max()) <= 1e-12


@pytest.mark.slow
def test_chunked_drift_matches_the_materialized_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same settings through both constructions (different random streams, the same
    # distributions): the mean |log r| of logit-noise drift and the mean |ℓ_old − ℓ_rollout| agree
    # within 5 standard errors of their difference, √(s_a²/n_a + s_b²/n_b) over ~1,900 tokens
    # each (4 seeds).
    source = {"drift": {"kind": "logit_noise", "scale": 0.3}, "rollout_drift": 0.3}

    def gaps() -> tuple[torch.Tensor, torch.Tensor]:
        ratio, rollout = [], []
        for seed in range(4):
            batch = synthetic_batch(seed=seed, **source)
            m = batch.mask
            assert batch.rollout_logp is not None
            ratio.append((softmax_view(batch).logp - batch.old_logp)[m].abs())
            rollout.append((batch.old_logp - batch.rollout_logp)[m].abs())
        return torch.cat(ratio), torch.cat(rollout)

    materialized = gaps()
    monkeypatch.setattr(synthetic, "MATERIALIZE_ENTRIES", 0)
    blocks = gaps()
    for a, b in zip(materialized, blocks, strict=True):
        se = math.sqrt(float(a.var()) / a.numel() + float(b.var()) / b.numel())
        assert abs(float(a.mean()) - float(b.mean())) < 5 * se
        assert float(b.mean()) > 0.01  # the drift is there


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_the_budget_changes_no_number(dtype: torch.dtype) -> None:
    # Budget 0 keeps no z⁰ tile (every sweep recomputes them), a large one keeps all: the batch is
    # the same bit for bit (random streams per block, reductions over fixed tiles).
    source = {"drift": {"kind": "logit_noise"}, "rollout_drift": 0.1, "ref_drift": 0.2}
    none, _, _ = chunked(dtype, seed=6, budget=0, **source)
    every, _, _ = chunked(dtype, seed=6, budget=1 << 40, **source)
    assert none.kept_tiles == 0 and every.kept_tiles == every.tiles == 9
    for field in dataclasses.fields(ChunkedPolicies):
        a, b = getattr(none, field.name), getattr(every, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field.name
    assert none.scale == every.scale


def test_chunked_is_seeded() -> None:
    a, _, _ = chunked(F32, seed=7)
    b, _, _ = chunked(F32, seed=7)
    c, _, _ = chunked(F32, seed=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.weight, c.weight) and not torch.equal(a.tokens, c.tokens)


def test_chunked_temperature_scales_the_weight() -> None:
    # c = 1/(√H·τ): τ = 0.5 doubles c exactly, and so W = c·W0 (a power of two).
    a, _, _ = chunked(F32, entropy=None, temperature=1.0)
    b, _, _ = chunked(F32, entropy=None, temperature=0.5)
    assert b.sweeps == 0 and b.scale == 2 * a.scale == 2 / math.sqrt(H)
    assert torch.equal(b.weight, 2 * a.weight)


def test_the_materialized_construction_stays_below_its_threshold() -> None:
    # The default batch (and so every recorded report) keeps the materialized construction;
    # a Qwen-sized vocabulary does not.
    assert synthetic.materialized(section(vocab_size=2048, hidden_size=64))
    assert not synthetic.materialized(section(vocab_size=151936, hidden_size=1024))
    assert not synthetic.materialized(section(vocab_size=2048, hidden_size=4096))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (bytes of its own extent)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                if size > self.largest:
                    self.largest, self.op = size, str(func)
        return out


class InThread:
    """A stand-in for ThreadPoolExecutor that runs every task at once in the calling thread
    (a dispatch mode sees the operations of its own thread only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> InThread:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(fn(*args))
        return done

    def map(self, fn: Any, items: Any) -> Any:
        return map(fn, items)


@pytest.mark.slow
def test_a_qwen_vocabulary_is_built_without_a_tokens_by_vocabulary_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # V = 151,936 with ~100 valid tokens and H = 2: any [N, T, V] or [M, V] tensor, even of
    # bool, is ≥ M·V bytes ≈ 15 MB, and every operation's output is recorded (the worker
    # threads' too: they run in this thread here). The chunked construction's largest are its
    # [ROW_TILE ≥ M, VOCAB_BLOCK] float64 tiles (~1.6 MB) and the batch's own W [V, 2]
    # (1.2 MB); the limit sits between the two.
    monkeypatch.setattr(synthetic_chunked, "ThreadPoolExecutor", InThread)
    config = validate(
        {
            "source": {
                "num_sequences": 8,
                "min_length": 8,
                "max_length": 16,
                "vocab_size": 151936,
                "hidden_size": 2,
            },
            "diagnostics": {"memory_budget_mib": 8},
        }
    )
    with LargestTensor() as probe:
        batch = build_batch(config, CPU, F32)
    m = int(batch.mask.sum())
    assert "built in blocks" in batch.source
    limit = 4 * 2**20
    assert m * 151936 > 3 * limit  # a [M, V] tensor of any dtype would break the limit
    assert probe.largest <= limit, (probe.largest, probe.op)
    assert bool((batch.old_logp[batch.mask] <= 0).all())


def test_the_memory_plan_of_a_chunked_batch_holds_no_tokens_by_vocabulary_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default batch (16 × ≤64 tokens) at V = 151,936, H = 1,024 in float32, budget 64 MiB.
    # Whole tensors would hold N·T·V = 16·64·151,936 ≈ 1.56e8 entries several times over
    # (≥ 16 bytes each for the sampling probabilities alone: 2.5 GB); in blocks the plan is
    #   hidden [N, T, H] float64 + float32   16·64·1024·12        =  12.6 MB
    #   valid tokens' copies (M ≤ N·T)        1024·1024·(4 + 4)    =   8.4 MB
    #   W [V, H] float32                      151,936·1024·4       = 622.3 MB
    #   tiles and weight blocks  8·2048·(12·256 + 4·1024)          = 117.4 MB (> the budget)
    #   calibration tiles kept: max(0, 64 MiB − 117.4 MB)          =   0
    #   per-token vectors 1024·8·16 and lengths 16·(8 + 64)        ≈   0.13 MB
    config = validate(
        {
            "source": {"vocab_size": 151936, "hidden_size": 1024},
            "diagnostics": {"memory_budget_mib": 64},
        }
    )
    ctx = source_context(config, CPU)
    plan = synthetic.plan_synthetic(config.source, ctx)
    (estimate,) = plan.memory
    terms = dict(estimate.terms)
    assert not any("[N, T, V]" in name or "[N·T, V]" in name for name in terms)
    assert terms["lm_head [V, H]"] == 151936 * 1024 * 4
    assert terms["calibration tiles kept (the memory budget)"] == 0
    assert estimate.total == pytest.approx(761.0e6, rel=0.01)
    monkeypatch.setattr(synthetic, "materialized", lambda src: True)
    whole = synthetic.plan_synthetic(config.source, ctx).memory[0].total
    assert whole > 3 * estimate.total  # the estimate the chunked construction replaces


@pytest.mark.usefixtures("chunk_everything")
@pytest.mark.parametrize("engine", ["materialized", "streamed"])
def test_compare_runs_on_a_chunked_batch(engine: str) -> None:
    config = validate(
        {
            "dtype": "float64",
            "losses": ["reinforce", "ppo_clip", "grpo"],
            "source": {**BASE, "num_sequences": 8, "rollout_drift": 0.1, "ref_drift": 0.2},
            "diagnostics": {"engine": engine, "reference": "autograd"},
        }
    )
    report = run_compare(config)
    assert "built in blocks" in report.batch.source
    assert report.passed, [c for c in report.checks if not c.passed]
    assert report.batch.mean_entropy == pytest.approx(0.5, abs=2 * ENTROPY_TOL)
