"""The vocab-parallel engine on P gloo ranks equals the single-process streamed engine.

Each world size is one `run_ranks` launch (P spawned processes) that runs every case: all
registered losses at once (plus a difference set c_B − c_A, as parity adds), every aggregation,
with and without the entropy bonus, with and without the top-entropy token selection (the losses
then read pass 1's global H_t, and the bonus's weight is a function of it), both ways of
combining pass 1, three chunkings; the sampled
ids include every shard's first and last row (v0_r and v1_r − 1). Every field of the
`EngineResult` each rank returns is compared with `lm_head_pass` on the whole W, in float64.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import pytest
import torch
from helpers import make_batch
from torch import Tensor

from gradlens.containers import Batch, KeptSets, valid_index
from gradlens.engine.collectives import (
    CollectiveError,
    CollectiveRecord,
    Collectives,
    check_replicated,
    exchange_errors,
)
from gradlens.engine.launch import RankFailure, run_ranks
from gradlens.engine.streamed import (
    CoefficientFn,
    EnginePlan,
    EngineResult,
    EntropyWeight,
    first_pass,
    lm_head_pass,
)
from gradlens.engine.vocab_parallel import PASS1, vocab_parallel_pass
from gradlens.engine.vocab_split import (
    VocabSplit,
    balanced_split,
    even_split,
    split_vocab,
)
from gradlens.errors import GradlensError
from gradlens.grads import objective, on_grid, replay, replayed_ids
from gradlens.losses import Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.aggregation import AGGREGATIONS
from gradlens.losses.base import Correction

F64 = torch.float64
# Every registered loss with the top-entropy selection (H_t from pass 1); without it, the losses
# that do not read H_t (the engine then computes no H_t unless the bonus is on).
NAMES = loss_names()
PLAIN_NAMES = [n for n in NAMES if "entropy" not in get_loss(n).needs]
SELECTION = 0.5  # ρ of the top-entropy selection: half the tokens keep their gradient
# Narrow clips, the dual clip, OPSM and a sequence-level correction: many tokens in a clipped or
# masked region, so that the losses' coefficients differ from each other.
PARAMS = [
    LossParams(eps_low=0.1, eps_high=0.1),
    LossParams(
        eps_low=0.15,
        eps_high=0.2,
        dual_clip=2.0,
        opsm_delta=0.05,
        corrections=(Correction("seq_tis", None, 1.5), Correction("token_mis", 0.5, 2.0)),
    ),
]
# (the plan of each rank, the single-process plan with the same residency or None)
PLANS = [
    (EnginePlan(vocab_chunk=5, resident=0), EnginePlan(vocab_chunk=5, resident=0)),
    (EnginePlan(vocab_chunk=4, resident=2), None),  # partly resident: other GEMM counts
    (EnginePlan(vocab_chunk=64, resident=1), EnginePlan(vocab_chunk=64, resident=1)),
]
ENTROPY_COEF = 0.05
# float64 throughout; the two runs differ only in the order of the sums over the vocabulary
# (chunk and shard boundaries) and of the logsumexp combination: ≲ 100 terms of ≤ 1 ulp each
# relative to the quantity's scale, so 1e-12 (~4500 ulps) holds with a wide margin.
TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class Case:
    """One engine run: a batch, its split, the losses' settings, the plan and pass 1's way."""

    batch: Batch
    split: VocabSplit
    params: LossParams
    agg: Aggregation
    entropy: bool
    selection: bool
    pass1: str
    plan: EnginePlan
    reference_plan: EnginePlan | None


def case_batch(split: VocabSplit, seed: int, hidden: int = 6) -> Batch:
    """A float64 batch over ``split.vocab`` rows whose first sampled ids are every shard's first
    and last row and one row inside it; then random ids. Ragged masks, advantages of both signs
    (one sequence with A = 0), π_old, μ_old and π_ref drifted from π_θ."""
    gen = torch.Generator().manual_seed(seed)
    n, t, v = 7, 9, split.vocab
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[:2] = t  # 18 positions for the designed ids (3 per rank, P ≤ 4 → 12)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    h = torch.randn(n, t, hidden, generator=gen, dtype=F64)  # [N, T, H]
    weight = 2.0 * torch.randn(v, hidden, generator=gen, dtype=F64) / math.sqrt(hidden)  # [V, H]
    designed = []
    for r in range(split.world):
        v0, v1 = split.shard(r)
        designed += [v0, v1 - 1, (v0 + v1) // 2]
    tokens = torch.randint(0, v, (n, t), generator=gen)  # [N, T]
    rows, cols = valid_index(mask)
    tokens[rows[: len(designed)], cols[: len(designed)]] = torch.tensor(designed)
    adv = torch.randn(n, generator=gen, dtype=F64)
    adv[3] = 0.0
    batch = make_batch(h, weight, tokens, mask, advantages=adv[:, None].expand(n, t).clone())
    noise = torch.randn(3, n, t, generator=gen, dtype=F64)
    old = batch.old_logp - 0.3 * noise[0]
    return dataclasses.replace(
        batch,
        old_logp=old,
        rollout_logp=old - 0.2 * noise[1],
        ref_logp=old + 0.2 * noise[2],
        groups=torch.arange(n) // 2,  # prompt groups of two (real)
    )


def coefficient_fn(case: Case) -> CoefficientFn:
    """Every loss's c_t on the valid tokens (`names`), as `gradlens compare` computes them,
    and one difference set c_ppo_clip − c_ppo (a parity pair, without the entropy bonus). With
    the selection the engine hands over pass 1's H_t too."""
    batch, agg = case.batch, case.agg
    rows, cols = valid_index(batch.mask)
    quantile = SELECTION if case.selection else 1.0
    params = dataclasses.replace(
        case.params, entropy_coef=_coef(case), top_entropy_quantile=quantile
    )
    losses = names(case)

    def coefficients(logp_valid: Tensor, entropy_valid: Tensor | None = None) -> list[Tensor]:
        logp = on_grid(logp_valid, rows, cols, batch.mask.shape)
        entropy = None if entropy_valid is None else on_grid(entropy_valid, rows, cols, logp.shape)
        out = []
        for name in losses:
            obj = objective(batch, logp, get_loss(name), params, agg, entropy)
            out.append(obj.coefficient[rows, cols])
        out.append(out[losses.index("ppo_clip")] - out[losses.index("ppo")])
        return out

    return coefficients


def names(case: Case) -> list[str]:
    return NAMES if case.selection else PLAIN_NAMES


def _coef(case: Case) -> float:
    return ENTROPY_COEF if case.entropy else 0.0


def entropy_weight(case: Case) -> EntropyWeight | None:
    """w_t = c_H·a_t of the entropy bonus, or None; with the selection the function of pass 1's
    H_t [M] that gives c_H·a_t·S_t, S_t = 1[H_t ≥ the (1 − ρ)-quantile of H over the tokens]."""
    if not case.entropy:
        return None
    rows, cols = valid_index(case.batch.mask)
    agg = case.agg
    a = agg.weights(case.batch.mask, F64, case.batch.groups)
    w = ENTROPY_COEF * a[rows, cols]
    if not case.selection:
        return w

    def selected(entropy: Tensor) -> Tensor:
        return w * (entropy >= torch.quantile(entropy, 1.0 - SELECTION)).to(w.dtype)

    return selected


def kept_of(case: Case) -> Tensor | None:
    """[M, K] the replayed kept sets of the valid tokens, or None (the whole vocabulary)."""
    ids = replayed_ids(case.batch)
    if ids is None:
        return None
    rows, cols = valid_index(case.batch.mask)
    return ids[rows, cols]


def run_case(case: Case, rank: int, comm: Collectives | None = None) -> EngineResult:
    rows, cols = valid_index(case.batch.mask)
    return vocab_parallel_pass(
        case.batch.hidden[rows, cols],
        case.split.weight_shard(case.batch.weight, rank),
        case.batch.tokens[rows, cols],
        coefficient_fn(case),
        case.plan,
        case.split,
        comm,
        entropy_weight=entropy_weight(case),
        entropy_losses=len(names(case)),
        pass1=case.pass1,
        token_entropy=case.selection,
        kept_ids=kept_of(case),
    )


def reference(case: Case) -> EngineResult:
    rows, cols = valid_index(case.batch.mask)
    return lm_head_pass(
        case.batch.hidden[rows, cols],
        case.batch.weight,
        case.batch.tokens[rows, cols],
        coefficient_fn(case),
        case.reference_plan or EnginePlan(vocab_chunk=64, resident=1),
        entropy_weight=entropy_weight(case),
        entropy_losses=len(names(case)),
        token_entropy=case.selection,
        kept_ids=kept_of(case),
    )


def gemms(case: Case, got: EngineResult) -> float:
    """The single-process engine's GEMM count with ``got``'s coefficients. (Not the reference's
    own count: a loss shares an earlier loss's dense product where their coefficients are
    bitwise equal, and the last-ulp differences of log π(y) between the two runs can move a
    token in or out of that set.)"""
    rows, cols = valid_index(case.batch.mask)
    assert case.reference_plan is not None
    return lm_head_pass(
        case.batch.hidden[rows, cols],
        case.batch.weight,
        case.batch.tokens[rows, cols],
        lambda _: list(got.coefficients),
        case.reference_plan,
        entropy_weight=entropy_weight(case),
        entropy_losses=len(names(case)),
        kept_ids=kept_of(case),
    ).gemm_equivalents


def cases_for(splits: list[VocabSplit]) -> list[Case]:
    """Every aggregation × entropy bonus × pass-1 combination, cycling through the splits, the
    losses' settings and the plans; every third case with the top-entropy selection (with and
    without the bonus, both ways of combining pass 1)."""
    batches = {s.bounds: case_batch(s, seed=len(s.bounds) * 100 + i) for i, s in enumerate(splits)}
    out = []
    combos = itertools.product(AGGREGATIONS, (False, True), PASS1)
    for i, (mode, entropy, pass1) in enumerate(combos):
        split = splits[i % len(splits)]
        plan, ref_plan = PLANS[i % len(PLANS)]
        out.append(
            Case(
                batch=batches[split.bounds],
                split=split,
                params=PARAMS[i % len(PARAMS)],
                agg=Aggregation(mode, 12.0 if mode == "seq_mean_token_sum_norm" else None),
                entropy=entropy,
                selection=i % 3 == 0,
                pass1=pass1,
                plan=plan,
                reference_plan=ref_plan,
            )
        )
    return out


def engine_ranks(rank: int, world: int, cases: list[Case]):
    """Run on every rank: each case's result and the collectives it ran; then the replication
    check on the cases' inputs and on ids that differ on every rank but 0 (its message)."""
    out = []
    for case in cases:
        comm = Collectives()
        out.append((run_case(case, rank, comm), comm.log))
    batch = cases[0].batch
    inputs = {"hidden": batch.hidden, "tokens": batch.tokens, "mask": batch.mask}
    check_replicated(Collectives(), inputs)
    try:
        check_replicated(Collectives(), {**inputs, "tokens": batch.tokens + (rank > 0)})
    except GradlensError as e:
        return out, str(e)
    return out, None


def fields(res: EngineResult) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Every tensor of a result, with the scale its error is measured against (None: itself)."""
    t = res.tokens
    out: dict[str, tuple[Tensor | None, Tensor | None]] = {
        "lse": (t.lse, None),
        "logp": (t.logp, None),
        "prob_sum": (t.prob_sum, None),
        "entropy": (t.entropy, None),
        "max_other_prob": (t.max_other_prob, None),
        "max_abs_logit": (t.max_abs_logit, None),
        "entropy_grad_at_y": (t.entropy_grad_at_y, None),
        # Σ_v E_v is 0 up to rounding: measured against the size of the entries, |E_y|
        "entropy_grad_sum": (t.entropy_grad_sum, t.entropy_grad_at_y),
    }
    for i, (c, rows) in enumerate(zip(res.coefficients, res.rows, strict=True)):
        out[f"c[{i}]"] = (c, None)
        out[f"norms[{i}]"] = (rows.norms, None)
        # Σ_v ∂L/∂W_v is 0 up to rounding for the c-form: against ‖∂L/∂W‖_F
        out[f"row_sum[{i}]"] = (rows.row_sum, rows.norms.norm()[None])
        out[f"other_mass[{i}]"] = (rows.other_mass, None)
        out[f"other_max[{i}]"] = (rows.other_max, None)
    return out


def shared_scales(got: EngineResult, ref: EngineResult, hidden: Tensor) -> dict[str, Tensor]:
    """Per loss whose dense product is an earlier loss's plus a correction (in either run), the
    size of what entered it: Σ_t |c|·‖h_t‖ with |c| `RowStats.gemm_scale` bounds every entry of
    πᵀ(c⊙h). Its rounding is measured against that, not against the loss's own (perhaps far
    smaller) rows: D_k = D_j + Δ carries D_j's ulps."""
    h = hidden.norm(dim=-1)  # [M]
    out = {}
    for i, (a, b) in enumerate(zip(got.rows, ref.rows, strict=True)):
        sizes = [float((s * h).sum()) for s in (a.gemm_scale, b.gemm_scale) if s is not None]
        if sizes:  # the rows and their sum Σ_v ∂L/∂W_v
            out[f"norms[{i}]"] = out[f"row_sum[{i}]"] = torch.tensor([max(sizes)], dtype=F64)
    return out


def assert_equal(
    got: EngineResult, ref: EngineResult, label: str, hidden: Tensor | None = None
) -> None:
    a, b = fields(got), fields(ref)
    assert a.keys() == b.keys()
    shared = {} if hidden is None else shared_scales(got, ref, hidden)
    for key, (x, _) in a.items():
        y, scale = b[key]
        if key in shared and y is not None:
            own = (y if scale is None else scale).abs().max()[None]
            scale = torch.maximum(shared[key], own)
        assert (x is None) == (y is None), f"{label}: {key} present in one result only"
        if x is None or y is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype == F64, f"{label}: {key}"
        s = float((y if scale is None else scale).abs().max()) if y.numel() else 0.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= TOL * max(s, 1e-300), f"{label}: {key} differs by {err:.3g} (scale {s:.3g})"


def expected_log(case: Case, world: int) -> list[tuple[str, str, int]]:
    """(step, op, elements) of each collective: the formulas of docs/scaling.md."""
    m = int(case.batch.mask.sum())
    k = len(names(case)) + 1
    v, h = case.split.vocab, case.batch.weight.shape[1]
    n_ent = len(names(case)) if case.entropy else 0
    e = int(case.entropy)
    h1 = int(case.entropy or case.selection)  # pass 1 gives H_t: its tilt T is one more column
    if case.pass1 == "all_gather":  # m, ζ, α, μ and the float64 S (and T): all float64 here
        log = [("pass1", "all_gather", m * (5 + h1))]
    else:  # ζ and S (and T) split in two on a grid
        log = [
            ("pass1.max", "all_reduce_max", 3 * m),
            ("pass1.sum", "all_reduce_sum", (3 + 2 * h1) * m),
        ]
    log.append(("finish.sum", "all_reduce_sum", k * v + (1 + n_ent) * m + 1))
    log.append(("finish.gather", "all_gather", k * h + (1 + e) * m))
    if n_ent:
        log.append(("finish.max", "all_reduce_max", n_ent * m))
    return log


def check_world(splits: list[VocabSplit], cases: list[Case] | None = None) -> None:
    world = splits[0].world
    cases = cases_for(splits) if cases is None else cases
    launched = run_ranks(engine_ranks, world, (cases,), timeout_s=120)
    assert len(launched) == world
    others = ", ".join(str(r) for r in range(1, world))
    for _, mismatch in launched:  # the same message on every rank
        assert mismatch == (
            "tensor_parallel: every rank must hold the same inputs, and these differ: "
            f"tokens (rank {others} against rank 0)"
        )
    per_rank = [results for results, _ in launched]
    for i, case in enumerate(cases):
        ref = reference(case)
        ids = kept_of(case)
        held = torch.zeros(case.split.vocab, dtype=torch.bool)  # rows some K_t holds
        held[torch.arange(case.split.vocab) if ids is None else ids[ids >= 0]] = True
        hidden = case.batch.hidden[case.batch.mask]  # [M, H]
        label = (
            f"case {i} ({case.agg.mode}, bonus={case.entropy}, selection={case.selection}, "
            f"{case.pass1}, {case.plan})"
        )
        if case.reference_plan is not None:  # the same residency: the same GEMM count
            count = gemms(case, per_rank[0][i][0])
            assert per_rank[0][i][0].gemm_equivalents == pytest.approx(count, rel=TOL), label
        for rank, results in enumerate(per_rank):
            got, log = results[i]
            assert_equal(got, ref, f"{label}, rank {rank}", hidden)
            for stats in got.rows:  # a row outside every K_t: exactly 0
                assert torch.all(stats.norms[~held] == 0.0), label
            assert got.gemm_equivalents == per_rank[0][i][0].gemm_equivalents  # one sum
            assert [(r.step, r.op, r.elements) for r in log] == expected_log(case, world)
            assert all(r.payload_bytes == 8 * r.elements for r in log)  # float64
            if case.pass1 == "all_gather":  # combined locally in rank order: bitwise equal
                for c0, c in zip(per_rank[0][i][0].coefficients, got.coefficients, strict=True):
                    assert torch.equal(c0, c), label


@pytest.mark.slow
def test_world_2_even_split_equals_the_single_process_engine():
    check_world([even_split(52, 2)])


@pytest.mark.slow
def test_world_3_uneven_splits_equal_the_single_process_engine():
    # 50 rows over 3 ranks: the balanced split (17, 17, 16) and a lopsided one (7, 31, 12)
    check_world([balanced_split(50, 3), VocabSplit.from_sizes([7, 31, 12])])


@pytest.mark.slow
def test_world_4_equals_the_single_process_engine():
    check_world([even_split(52, 4), VocabSplit.from_sizes([1, 20, 2, 29])])


# --- a replayed sampling support (loss.sampling_support: kept) --------------------------------


def kept_sets(batch: Batch, split: VocabSplit, seed: int) -> KeptSets:
    """Kept sets K_t that hold y_t, designed at the first valid tokens after the ids of
    `case_batch`: for every shard boundary b a token with K_t = {y_t, b − 1, b} (straddling it),
    a token with K_t = {y_t} alone (no other entry: max_{v≠y} π̃ = 0), a token whose K_t lies in
    its owner's rows only (every other rank holds none of it: m_r = −inf, S_r = 0 there), and a
    token whose K_t is one row of every shard; the other tokens a random 40% of the rows not
    ≡ 0 mod 5 (the rows that no K_t holds must get exactly 0). Random kept
    masses of π_old, μ and π_ref (log S ∈ [−0.05, 0]) shift the stored log-probs."""
    gen = torch.Generator().manual_seed(seed)
    n, t, v = *batch.mask.shape, split.vocab
    keep = torch.rand(n, t, v, generator=gen) < 0.4  # [N, T, V]
    keep[..., torch.arange(v) % 5 == 0] = False  # rows in no random K_t (unless designed)
    rows, cols = valid_index(batch.mask)
    first = 3 * split.world  # the designed ids of `case_batch` come first
    designed: list[list[int]] = [[b - 1, b] for b in split.bounds[1:-1]]
    designed.append([])  # {y} alone
    designed.append([-1])  # marker: the owner's rows only
    designed.append(list(split.bounds[1:-1]))  # a row of every shard but the first, and y
    for i, extra in enumerate(designed):
        r, c = int(rows[first + i]), int(cols[first + i])
        keep[r, c] = False
        if extra == [-1]:
            v0, v1 = split.shard(int(split.owner(batch.tokens[r, c, None])))
            keep[r, c, v0:v1] = True
        else:
            keep[r, c, extra] = True
    keep.scatter_(-1, batch.tokens[..., None], True)  # y_t ∈ K_t
    width = int(keep.sum(-1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept ids first
    count = keep.sum(-1)  # [N, T]
    ids = torch.where(torch.arange(width) < count[..., None], order[..., :width], -1)
    # small shifts, so that every band-gated loss (rollout_is) keeps some tokens: a loss whose
    # c_t are all 0 has row norms of pure rounding (of another loss's shared dense product)
    masses = [-0.05 * torch.rand(n, t, generator=gen, dtype=F64) for _ in range(3)]
    return KeptSets(ids, "designed", *masses)


def replay_cases(splits: list[VocabSplit]) -> list[Case]:
    """`cases_for`'s cases (every aggregation, bonus and selection, both ways of combining pass
    1, the three plans) on a replayed batch: the losses read log π̃ and the shifted log-probs."""
    out = []
    replayed: dict[tuple[int, ...], Batch] = {}
    for case in cases_for(splits):
        key = case.split.bounds
        if key not in replayed:
            kept = kept_sets(case.batch, case.split, seed=len(key))
            replayed[key] = replay(dataclasses.replace(case.batch, kept=kept))
        out.append(dataclasses.replace(case, batch=replayed[key]))
    return out


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
def test_world_2_replays_the_kept_sets_as_the_single_process_engine():
    splits = [even_split(52, 2)]
    cases = replay_cases(splits)
    ids = kept_of(cases[0])
    assert ids is not None and bool((ids % 5 == 0).any())  # designed K_t hold such rows
    assert int((ids >= 0).sum(-1).min()) == 1  # K_t = {y}
    held = torch.zeros(52, dtype=torch.bool)
    held[ids[ids >= 0]] = True
    assert not bool(held.all())  # some rows in no K_t: check_world finds them exactly 0
    check_world(splits, cases)


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
def test_world_3_uneven_replays_the_kept_sets_as_the_single_process_engine():
    splits = [balanced_split(50, 3), VocabSplit.from_sizes([7, 31, 12])]
    check_world(splits, replay_cases(splits))


# --- one process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_rank_without_a_process_group_is_the_single_process_engine():
    split = even_split(52, 1)
    for case in cases_for([split])[:4]:
        got = run_case(case, 0)
        assert_equal(got, reference(case), case.agg.mode)
        if case.reference_plan is not None:
            assert got.gemm_equivalents == pytest.approx(gemms(case, got), rel=TOL)


def test_first_pass_max_other_logit_gives_the_largest_other_probability():
    """exp(max_{v≠y} z_v − lse) from pass 1 is pass 2's max_{v≠y} π_v, including a token whose
    id is the largest logit of its row (so that the max must skip it)."""
    split = even_split(52, 1)
    case = cases_for([split])[0]
    rows, cols = valid_index(case.batch.mask)
    hidden, tokens = case.batch.hidden[rows, cols], case.batch.tokens[rows, cols].clone()
    tokens[0] = int((hidden[0] @ case.batch.weight.T).argmax())
    plan = EnginePlan(vocab_chunk=5, resident=1)
    first = first_pass(hidden, case.batch.weight, tokens, plan, other_logit=True)
    ref = lm_head_pass(hidden, case.batch.weight, tokens, lambda lp: [lp], plan)
    assert first.max_other_logit is not None
    got = torch.exp(first.max_other_logit - first.lse)
    assert torch.allclose(got, ref.tokens.max_other_prob, rtol=TOL, atol=0)
    assert float(got[0]) < float(ref.tokens.sampled_prob[0])  # the max skipped y


def test_splits():
    assert even_split(12, 4).bounds == (0, 3, 6, 9, 12)
    assert balanced_split(11, 3).sizes == [4, 4, 3]
    assert balanced_split(12, 3) == even_split(12, 3)
    assert split_vocab(11, 3).sizes == [4, 4, 3]
    s = VocabSplit.from_sizes([2, 5, 1])
    assert s.bounds == (0, 2, 7, 8) and s.world == 3 and s.vocab == 8
    owner = s.owner(torch.tensor([0, 1, 2, 6, 7]))
    assert owner.tolist() == [0, 0, 1, 1, 2]  # v1_r − 1 stays on r, v0_r starts the next
    w = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(s.weight_shard(w, 1), w[2:7])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: even_split(10, 3), "multiple of 3"),
        (lambda: balanced_split(2, 3), "at most 2 ranks"),
        (lambda: balanced_split(5, 0), "0 ranks"),
        (lambda: VocabSplit.from_sizes([3, 0]), "at least one row"),
        (lambda: split_vocab(8, 2, "evn"), "did you mean 'even'"),
        (lambda: even_split(8, 2).weight_shard(torch.zeros(9, 2), 0), "9 rows"),
    ],
)
def test_bad_splits_are_user_errors(make, words):
    with pytest.raises(GradlensError, match=words):
        make()


def test_a_shard_of_the_wrong_size_is_a_user_error():
    case = cases_for([even_split(52, 1)])[0]
    rows, cols = valid_index(case.batch.mask)
    with pytest.raises(GradlensError, match="rank 0 holds rows"):
        vocab_parallel_pass(
            case.batch.hidden[rows, cols],
            case.batch.weight[:50],
            case.batch.tokens[rows, cols],
            coefficient_fn(case),
            case.plan,
            case.split,
        )
    with pytest.raises(GradlensError, match="did you mean 'max_sum'"):
        run_case(dataclasses.replace(case, pass1="max_summ"), 0)


# --- failures ----------------------------------------------------------------------------------


def raising_ranks(rank: int, world: int, case: Case, failing: int, how: str):
    """Run the case; rank ``failing`` raises (or hangs) in its coefficient callback, after
    pass 1's collective and before the finishing ones."""
    inner = coefficient_fn(case)

    def coefficients(*args: Tensor) -> list[Tensor]:
        if rank == failing:
            if how == "hang":
                time.sleep(3600)
            raise ValueError(f"a loss failed on rank {rank}")
        return inner(*args)

    rows, cols = valid_index(case.batch.mask)
    return vocab_parallel_pass(
        case.batch.hidden[rows, cols],
        case.split.weight_shard(case.batch.weight, rank),
        case.batch.tokens[rows, cols],
        coefficients,
        case.plan,
        case.split,
        token_entropy=case.selection,
    )


@pytest.mark.slow
def test_a_rank_that_raises_fails_every_rank_with_a_clear_error():
    split = balanced_split(50, 3)
    case = cases_for([split])[0]
    with pytest.raises(RankFailure) as info:
        run_ranks(raising_ranks, 3, (case, 1, "raise"), timeout_s=60, grace_s=5)
    message = str(info.value)
    assert "3 of 3 ranks failed; rank 1 first: ValueError: a loss failed on rank 1" in message
    outcomes = {o.rank: o for o in info.value.outcomes}
    assert outcomes[1].traceback is not None and "coefficients" in outcomes[1].traceback
    for r in (0, 2):  # their finishing collective failed when rank 1 left
        assert outcomes[r].error is not None
        assert outcomes[r].error.startswith(f"{CollectiveError.__name__}: rank {r} of 3")
        assert "step 'finish.sum'" in outcomes[r].error


@pytest.mark.slow
def test_a_rank_that_hangs_makes_the_others_time_out_and_is_stopped():
    split = even_split(52, 2)
    case = cases_for([split])[0]
    with pytest.raises(RankFailure) as info:
        run_ranks(raising_ranks, 2, (case, 1, "hang"), timeout_s=3, grace_s=2)
    outcomes = {o.rank: o for o in info.value.outcomes}
    assert outcomes[0].error is not None and "step 'finish.sum'" in outcomes[0].error
    assert outcomes[1].error is not None and "after another rank failed; stopped" in (
        outcomes[1].error
    )
    assert str(info.value).startswith("2 of 2 ranks failed; rank 0 first: CollectiveError")


# --- NCCL --------------------------------------------------------------------------------------


def nccl_ranks(rank: int, world: int, case: Case):
    cuda = dataclasses.replace(
        case,
        batch=dataclasses.replace(
            case.batch,
            hidden=case.batch.hidden.cuda(),
            weight=case.batch.weight.cuda(),
            tokens=case.batch.tokens.cuda(),
            mask=case.batch.mask.cuda(),
            old_logp=case.batch.old_logp.cuda(),
            advantages=case.batch.advantages.cuda(),
            groups=None if case.batch.groups is None else case.batch.groups.cuda(),
            rollout_logp=None,
            ref_logp=None,
        ),
        params=PARAMS[0],
    )
    res = run_case(cuda, rank)
    return res.tokens.logp.cpu(), [r.norms.cpu() for r in res.rows]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices")
def test_nccl_two_ranks_equal_the_single_process_engine():
    split = even_split(52, 2)
    case = dataclasses.replace(cases_for([split])[0], params=PARAMS[0])
    case = dataclasses.replace(
        case, batch=dataclasses.replace(case.batch, rollout_logp=None, ref_logp=None)
    )
    ref = reference(case)
    for logp, norms in run_ranks(nccl_ranks, 2, (case,), timeout_s=120, device="cuda"):
        assert torch.allclose(logp, ref.tokens.logp, rtol=0, atol=TOL)
        for got, want in zip(norms, ref.rows, strict=True):
            assert float((got - want.norms).abs().max()) <= TOL * float(want.norms.max())


def test_replication_check_in_one_process_passes():
    check_replicated(Collectives(), {"x": torch.ones(3, dtype=torch.bfloat16)})
    check_replicated(Collectives(), {})


def test_error_exchange_in_one_process_returns_its_own_outcome():
    assert exchange_errors(Collectives(), None, "phase") == [None]
    message = "source.path: no such file 'π_old.pt'"  # non-ASCII survives the byte round trip
    assert exchange_errors(Collectives(), message, "phase") == [message]
    assert exchange_errors(Collectives(), "", "phase") == [""]  # an empty message is an error


def test_collective_records_count_ring_bytes():
    comm = Collectives()
    x = torch.zeros(10, dtype=F64)
    comm.all_reduce(x, "sum", "a")
    comm.all_gather(x, "b")
    assert comm.log == [
        CollectiveRecord("a", "all_reduce_sum", 10, 80, 0.0),  # one rank sends nothing
        CollectiveRecord("b", "all_gather", 10, 80, 0.0),
    ]
