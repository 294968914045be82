"""The stale steps of the model source: against a plain PyTorch loop, in micro-batches, and
with a target KL.

The slow twin is a hand-written loop: the model's own logits (``model(...).logits``, not
gradlens's hidden-state path), log_softmax, the same objective, ``torch.optim.Adam`` (not
gradlens's optimizer), no activation checkpointing, everything in float64.
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from helpers import build_batch
from rich.console import Console

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.diagnostics.staleness import FAR_CLIP, FAR_KL, kl_k3
from gradlens.errors import GradlensError
from gradlens.grads import objective
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.report.model_table import model_parts
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import row_gradient_embedding
from gradlens.sources.staleness import (
    MAX_PROBES,
    SCALE_LIMITS,
    TARGET_BAND,
    LearningRateSearch,
    line_scale,
    subset_rows,
)

transformers = pytest.importorskip("transformers")

from tiny_checkpoints import save_checkpoint  # noqa: E402

PROMPTS = ["def add(a, b):\n", "class Point:\n    def __init__(self", "import os\n"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("stale") / "llama", "llama")


def config(path, budget_mib=None, shared_prefix=True, **stale):
    cfg = {
        "dtype": "float64",
        "losses": ["ppo_clip"],
        "source": {
            "kind": "model",
            "path": str(path),
            "prompts": PROMPTS,
            "group_size": 2,
            "max_new_tokens": 6,
            "reward": "length",  # differs within every group: every advantage ≠ 0
            "rollout_dtype": "float32",
            "stale": {"optimizer": "adam", "loss": "ppo_clip", **stale},
            "shared_prefix": shared_prefix,
        },
    }
    if budget_mib is not None:
        cfg["diagnostics"] = {"memory_budget_mib": budget_mib}
    return validate(cfg)


def plain_loop(path, batch, steps, lr):
    """θ_old → θ_N by hand; the [N, T] log-probs at every θ_k."""
    loaded = load_checkpoint(str(path), torch.device("cpu"), torch.float64)
    model = loaded.model
    seqs = batch.model_context.sequences
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
    spec, params, agg = get_loss("ppo_clip"), LossParams(), Aggregation("token_mean")
    trajectory = []
    old = None
    for k in range(steps + 1):
        logits = model(
            input_ids=seqs.input_ids,
            attention_mask=seqs.attention_mask,
            position_ids=seqs.position_ids,
        ).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, seqs.tokens[..., None])[..., 0]
        logp = torch.where(seqs.loss_mask, logp, torch.zeros_like(logp))
        trajectory.append(logp.detach())
        if old is None:
            old = logp.detach()
        if k == steps:
            break
        inputs = dataclasses.replace(batch, old_logp=old)
        loss = objective(inputs, logp, spec, params, agg).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return trajectory


# The log-probs of two float64 passes over the batch: on the padded grid they differ in the
# order of the lm_head product (W·h by gradlens, the model's own logits) and the checkpointed
# recomputation is exact, so they agree to ~1e-13 after two Adam steps (Adam's first step is
# lr·g/|g|: rounding in g changes it only where |g| ~ ε = 1e-8, far from these gradients).
# With each prompt's completions packed in one row (source.shared_prefix) the products have
# other shapes, and transformers' LlamaRMSNorm computes in float32 whatever the model's dtype:
# float32's rounding, ~1e-7 relative of a hidden state, a few 1e-7 of a log-prob after two
# steps. A wrong mask moves a completion's log-probs by O(1) (it sees another completion).
PASSES_TOL = {False: 1e-10, True: 1e-6}


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_stale_steps_equal_a_plain_pytorch_loop(llama, packed):
    cfg = config(llama, shared_prefix=packed, steps=2, lr=3e-3, target_kl=None)
    batch = build_batch(cfg)
    record = batch.model_context.staleness
    expected = plain_loop(llama, batch, 2, 3e-3)  # on the padded grid
    m = batch.mask
    assert record.model_pass is not None and record.model_pass.shared_prefix is packed
    tol = PASSES_TOL[packed]
    for point, logp in zip(record.trajectory, expected, strict=True):
        torch.testing.assert_close(point.logp[m], logp[m], rtol=tol, atol=tol)
    assert record.model_pass.checkpointed
    assert record.model_pass.micro_batches == 1
    assert kl_k3(expected[-1], expected[0], m) > 1e-4  # the steps moved π_θ


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_micro_batched_stale_steps_equal_one_pass(llama, packed):
    one = build_batch(config(llama, shared_prefix=packed, steps=2, lr=3e-3, target_kl=None))
    # a budget of one byte: every sequence is a micro-batch of its own (over budget)
    many = build_batch(
        config(llama, budget_mib=1e-6, shared_prefix=packed, steps=2, lr=3e-3, target_kl=None)
    )
    plan = many.model_context.staleness.model_pass
    assert plan.micro_batches == one.num_sequences and plan.over_budget
    assert plan.forwards == plan.backwards == 2 * one.num_sequences
    # packed: the one pass packs each prompt's completions, a sequence alone cannot
    assert one.model_context.staleness.model_pass.shared_prefix is packed
    assert not plan.shared_prefix
    m = one.mask
    # gradients summed over micro-batches in another order (and, packed, products of other
    # shapes): PASSES_TOL, with the padded grid's atol as it was
    tol = PASSES_TOL[packed]
    atol = 1e-12 if not packed else tol
    torch.testing.assert_close(many.hidden[m], one.hidden[m], rtol=tol, atol=atol)
    for a, b in zip(
        many.model_context.staleness.trajectory, one.model_context.staleness.trajectory, strict=True
    ):
        torch.testing.assert_close(a.logp[m], b.logp[m], rtol=tol, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("guess", [1e-6, 3e-2])
def test_the_target_kl_is_reached_from_a_bad_first_guess(llama, guess):
    target = 0.02
    report = run_compare(config(llama, steps=2, lr=guess, target_kl=target))
    stale = report.model.staleness
    end = stale.trajectory[-1]
    assert target / TARGET_BAND <= end.kl_k3 <= target * TARGET_BAND
    assert stale.target_kl == target and stale.lr == guess
    first = stale.trajectory[1]
    assert first.probes >= 1 and first.lr != guess  # the guess was off by 30×+ either way
    # the second step's first lr comes from the first step's per-token line (next_lr): on this
    # model it lands within the band at once
    assert stale.trajectory[2].probes == 0
    assert not any("not within" in n for n in report.model.notes)
    # the first step's search starts on a quarter of the sequences (whole prompt groups), by
    # forwards without autograd; from a guess 30× off it redoes the step there at least once
    assert first.subset_probes >= 1 and stale.trajectory[2].subset_probes == 0
    # one micro-batch: every try on the whole batch at θ_k (k < N) is a forward with autograd,
    # its redos included; the one at θ_N is measured without autograd; one backward per step
    passes = stale.model_pass
    assert passes.micro_batches == 1
    assert passes.forwards == sum(1 + s.probes - s.subset_probes for s in stale.trajectory[:-1])
    assert passes.backwards == 2


@pytest.mark.slow
def test_a_step_far_beyond_ppo_is_reported(llama):
    report = run_compare(config(llama, steps=2, lr=5e-2, target_kl=None))
    end = report.model.staleness.trajectory[-1]
    assert end.kl_k3 > FAR_KL or end.clip_region > FAR_CLIP
    assert any("far beyond one PPO step" in n for n in report.model.notes)
    calm = run_compare(config(llama, steps=2, lr=5e-2, target_kl=0.01))
    assert not any("far beyond" in n for n in calm.model.notes)


def rendered(report) -> str:
    out = io.StringIO()
    console = Console(file=out, width=240, force_terminal=False)
    for part in model_parts(report):
        console.print(part)
    return out.getvalue()


@pytest.mark.slow
def test_the_tables_say_how_the_steps_ran_and_what_stands_out(llama):
    far = run_compare(config(llama, steps=2, lr=5e-2, target_kl=None))
    text = rendered(far)
    assert "notes on the checkpoint" in text and "far beyond one PPO step" in text
    assert "adam steps (lr 0.05)" in text  # no target: the configured lr, no search
    assert "lr (tries)" in text and "0.05 " in text  # the lr column: each step's lr
    plan = far.model.staleness.model_pass
    assert f"{plan.micro_batches} micro-batch(es), {plan.forwards} forward(s)" in text

    calm = run_compare(config(llama, steps=2, lr=5e-2, target_kl=0.01))
    text = rendered(calm)
    assert "notes on the checkpoint" not in text  # nothing stands out: no panel
    assert "target KL 0.01: lr searched from 0.05" in text
    first = calm.model.staleness.trajectory[1]
    assert first.probes >= 1  # 0.05 is far off: the step was redone
    subset = f", {first.subset_probes} on a subset" if first.subset_probes else ""
    assert f"{first.lr:.3g} ({first.probes + 1} tried{subset})" in text


def test_the_line_scale_solves_the_k3_of_a_straight_line_of_log_ratios():
    # a = 0, b = (1, −1): mean k3(s·b) = ((e^s − 1 − s) + (e^−s − 1 + s))/2 = cosh s − 1;
    # cosh s − 1 = 0.5 at s = acosh 1.5 = ln(1.5 + √1.25) = 0.96242
    a = torch.zeros(2, dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert line_scale(a, b, 0.5) == pytest.approx(math.acosh(1.5), rel=1e-9)
    # a goal beyond the scale limits: the nearer limit (cosh(1/30) − 1 = 5.6e-4 > 1e-12)
    assert line_scale(a, b, 1e-12) == SCALE_LIMITS[0]
    assert line_scale(a, b, 1e14) == SCALE_LIMITS[1]  # cosh 30 − 1 = 5.3e12 < 1e14
    assert line_scale(b, b, 1e-3) is None  # k3(a) = cosh 1 − 1 = 0.543 > 1e-3 at s = 0
    assert line_scale(a, torch.zeros(2, dtype=torch.float64), 0.5) is None  # nothing moved


def test_a_redo_follows_the_tokens_not_a_power_law_of_the_mean():
    # Step 1 of 2 toward 0.02 (goal 0.01 at k = 1) moved the log-ratios to (3, −3) at lr 1e-3:
    # KL = cosh 3 − 1 = 9.07, far outside the band. Per token: cosh(3s) − 1 = 0.01 at
    # 3s = acosh 1.01 = 0.141303, s = 0.047101. A KL ∝ lr² law would take √(0.01/9.07) = 0.0332.
    search = LearningRateSearch(0.02, 2)
    search.start_step(torch.zeros(2, dtype=torch.float64))
    measured = torch.tensor([3.0, -3.0], dtype=torch.float64)
    lr = search.propose(1, measured, 1e-3)
    assert lr == pytest.approx(1e-3 * math.acosh(1.01) / 3, rel=1e-9)
    # within the band (0.01/1.5 ≤ KL ≤ 0.015): accepted
    inside = torch.tensor([0.14, -0.14], dtype=torch.float64)  # cosh 0.14 − 1 = 0.00982
    assert search.propose(1, inside, lr) is None


def test_the_next_step_starts_where_the_last_ones_line_reaches_its_goal():
    # θ_1 at lr 2e-3 moved the log-ratios from 0 to (0.1, −0.1); step 2 of 2 toward 0.01 takes
    # the same change per lr: 0.1·(1 + s)·(1, −1), cosh(0.1(1 + s)) − 1 = 0.01 at
    # 0.1(1 + s) = acosh 1.01 = 0.141303, s = 0.41303: lr 2e-3·0.41303.
    search = LearningRateSearch(0.01, 2)
    here = torch.tensor([0.1, -0.1], dtype=torch.float64)
    before = torch.zeros(2, dtype=torch.float64)
    expected = 2e-3 * (math.acosh(1.01) / 0.1 - 1)
    assert search.next_lr(1, here, before, 2e-3) == pytest.approx(expected, rel=1e-9)
    assert LearningRateSearch(None, 2).next_lr(1, here, before, 2e-3) == 2e-3  # no target


@pytest.mark.parametrize(
    ("n", "groups", "expected"),
    [
        (16, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, [0, 4, 8, 12]),  # a quarter of each group
        (6, [0, 0, 0, 1, 1, 1], [0, 3]),  # ⌈3/4⌉ = 1 of each group
        (8, [0, 1, 0, 1, 2, 3, 2, 3], [0, 1, 4, 5]),  # groups not consecutive: each one's first
        (8, None, [0, 1]),  # no groups: one group, its first quarter
        (9, [0] * 9, [0, 1, 2]),  # ⌈9/4⌉
        (8, list(range(8)), [0, 4]),  # groups of one: every fourth sequence
        (4, [0, 1, 2, 2], None),  # one of each group: 3 of 4, more than half the batch
        (2, None, [0]),  # half
        (1, None, None),  # the whole batch
    ],
)
def test_the_first_step_is_searched_on_a_quarter_of_every_prompt_group(n, groups, expected):
    g = None if groups is None else torch.tensor(groups)
    assert subset_rows(n, g) == expected


class TinyLM(torch.nn.Module):
    """An embedding (with ``nn.Embedding``'s ``options``), a nonlinearity and an lm_head, tied
    or not."""

    def __init__(self, tied: bool, **options) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 5, **options)
        self.head = torch.nn.Linear(5, 13, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.embed(ids)))
        return torch.log_softmax(logits, -1)[..., :-1, :].gather(-1, ids[..., 1:, None]).sum()


def test_a_tied_embeddings_gradient_joins_the_lm_heads_as_rows():
    torch.manual_seed(0)
    model = TinyLM(tied=True).double()
    ids = torch.tensor([[1, 4, 4, 7, 1, 2], [3, 3, 9, 0, 12, 4]])  # repeated rows
    model.loss(ids).backward()
    dense = model.embed.weight.grad
    model.embed.weight.grad = None
    with row_gradient_embedding(model) as applies:
        assert applies and model.embed.sparse
        model.loss(ids).backward()
    assert not model.embed.sparse  # restored
    summed = model.embed.weight.grad
    assert summed.layout == torch.strided  # the optimizer's dense gradient
    torch.testing.assert_close(summed, dense, rtol=1e-14, atol=1e-14)  # the same sum


@pytest.mark.parametrize(("tied", "sparse"), [(False, False), (True, True)])
def test_the_row_gradient_leaves_untied_and_already_sparse_embeddings_alone(tied, sparse):
    model = TinyLM(tied=tied, sparse=sparse)
    with row_gradient_embedding(model) as applies:
        assert not applies and model.embed.sparse is sparse
    assert model.embed.sparse is sparse


def test_a_step_that_moved_nothing_is_redone_larger_unless_the_gradient_is_zero():
    # KL exactly 0: θ + lr·u rounded to θ (an update below the weights' resolution); with a
    # gradient that is not zero the step is redone with the largest scale, at most MAX_PROBES
    # times; a zero gradient (every advantage 0) moves nothing at any learning rate
    still = torch.zeros(10, dtype=torch.float64)
    search = LearningRateSearch(0.01, 2)
    search.start_step(still)
    proposed = [search.propose(1, still, 1e-11) for _ in range(MAX_PROBES + 1)]
    assert proposed == [1e-11 * SCALE_LIMITS[1]] * MAX_PROBES + [None]
    zero = LearningRateSearch(0.01, 2, gradient_zero=True)
    zero.start_step(still)
    assert zero.propose(1, still, 1e-11) is None


@pytest.mark.slow
def test_a_float32_step_below_the_weights_resolution_is_searched_up(llama):
    cfg = config(llama, steps=2, lr=1e-12, target_kl=0.02)
    report = run_compare(validate({**cfg.model_dump(mode="json"), "dtype": "float32"}))
    first = report.model.staleness.trajectory[1]
    assert first.probes >= 1 and first.lr > 1e-12 and first.kl_k3 > 0


def test_a_step_that_makes_the_log_probs_non_finite_is_refused_naming_the_lr(llama):
    named = r"source\.stale\.lr: stale step 1 at learning rate 1e\+30"
    with pytest.raises(GradlensError, match=named):
        run_compare(config(llama, steps=2, lr=1e30, target_kl=0.01))
