"""The split section against its autograd twin: each micro-batch differentiated alone, as the
framework's own code writes its loss (verl's and OpenRLHF's real aggregation functions where
they are installed), gradients summed over the accumulation steps and averaged over the ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from gradlens.diagnostics import tolerances
from gradlens.diagnostics.split import split_report
from gradlens.grads import objective, policy_pass, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.losses.frameworks.openrlhf import openrlhf_api
from gradlens.losses.split import Split
from tests.helpers import random_batch

SPLIT = Split(micro=2, dp=2, ga=2)
# float64 twin: the engine's pass and autograd sum the same terms in different orders, so they
# agree to a small multiple of u64 times the sums' conditioning: the float64 agreement tolerance.
TOL = tolerances.agreement(torch.float64)

MicroLoss = Callable[[Tensor, Tensor], Tensor]  # (per-token loss [n, T], mask [n, T]) → scalar


def twin_gradient(batch: Any, loss: str, micro_loss: MicroLoss, split: Split) -> Tensor:
    """∂L/∂W as a trainer forms it: per rank a fresh W, each of its micro-batches' losses
    backpropagated in turn (accumulated), then the ranks' gradients averaged."""
    spec = get_loss(loss)
    per_rank = []
    for rank in range(split.dp):
        weight = batch.weight.detach().clone().requires_grad_(True)
        p = policy_pass(batch.hidden, weight, batch.tokens, batch.mask)
        # per-token losses of the whole batch (each row reads only itself), token_sum: weight 1
        per_token = objective(batch, p.logp, spec, LossParams(), Aggregation("token_sum"))
        terms = per_token.terms.per_token  # [N, T]
        for step in range(split.ga):
            j = step * split.dp + rank
            rows = slice(j * split.micro, (j + 1) * split.micro)
            micro_loss(terms[rows], batch.mask[rows].to(terms.dtype)).backward(retain_graph=True)
        assert weight.grad is not None
        per_rank.append(weight.grad)
    return torch.stack(per_rank).mean(0)


def full_gradient(batch: Any, loss: str, aggregation: Aggregation) -> Tensor:
    weight = batch.weight.detach().clone().requires_grad_(True)
    p = policy_pass(batch.hidden, weight, batch.tokens, batch.mask)
    objective(batch, p.logp, get_loss(loss), LossParams(), aggregation).loss.backward()
    assert weight.grad is not None
    return weight.grad


def check_twin(
    convention: str, mode: str, micro_loss: MicroLoss, full: Aggregation, loss: str = "ppo_clip"
) -> Any:
    batch = random_batch(3, n=8, t=6)
    report = split_report(
        batch,
        softmax_view(batch).logp,
        [get_loss(loss)],
        LossParams(),
        Aggregation(mode),
        SPLIT,
        convention,
    )
    g_split = twin_gradient(batch, loss, micro_loss, SPLIT)
    g_full = full_gradient(batch, loss, full)
    r = report.losses[0]
    assert r.grad_norm_full == pytest.approx(float(g_full.norm()), rel=TOL)
    assert r.grad_norm_split == pytest.approx(float(g_split.norm()), rel=TOL)
    diff = float((g_split - g_full).norm() / g_full.norm())
    assert r.grad_rel_diff == pytest.approx(diff, rel=TOL, abs=TOL)
    return report


def tokens(m: Tensor) -> Tensor:
    return m.sum().clamp(min=1.0)


def test_trl_bnpo_local_token_mean_is_flagged() -> None:
    # TRL 1.16 _compute_loss, bnpo: (per_token_loss * mask).sum() / mask.sum().clamp(min=1),
    # then loss / current_gradient_accumulation_steps.
    def bnpo(pt: Tensor, m: Tensor) -> Tensor:
        return (pt * m).sum() / tokens(m) / SPLIT.ga

    report = check_twin("trl:bnpo", "token_mean", bnpo, Aggregation("token_mean"))
    assert not report.invariant and not report.losses[0].passed
    assert report.losses[0].grad_rel_diff > 1e-3
    assert "normalises by its own token count" in report.factor


def test_trl_grpo_seq_mean_passes() -> None:
    # TRL grpo: ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / ga; the
    # full batch: seq_mean_token_mean over every row (S = B).
    def grpo(pt: Tensor, m: Tensor) -> Tensor:
        return ((pt * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / SPLIT.ga

    full = Aggregation("seq_mean_token_mean", count_empty_sequences=True)
    report = check_twin("trl:grpo", "seq_mean_token_mean", grpo, full)
    assert report.invariant and report.losses[0].passed
    assert report.factor.startswith("split-invariant")


def test_trl_dapo_global_token_count_passes() -> None:
    # TRL dapo: normalizer = num_items_in_batch / num_processes · ga / steps_per_generation
    # (steps_per_generation = ga): Σ / (N/dp).
    n_total = float(random_batch(3, n=8, t=6).mask.sum())

    def dapo(pt: Tensor, m: Tensor) -> Tensor:
        return (pt * m).sum() / (n_total / SPLIT.dp)

    report = check_twin("trl:dapo", "token_mean", dapo, Aggregation("token_mean"))
    assert report.losses[0].passed


def test_ms_swift_learning_rate_over_ga_is_flagged() -> None:
    # ms-swift issue 10117: TRL's dapo normaliser and a second ÷ga: every weight ×1/ga = ×1/2.
    n_total = float(random_batch(3, n=8, t=6).mask.sum())

    def swift(pt: Tensor, m: Tensor) -> Tensor:
        return (pt * m).sum() / (n_total / SPLIT.dp) / SPLIT.ga

    report = check_twin("ms_swift", "token_mean", swift, Aggregation("token_mean"))
    r = report.losses[0]
    assert not r.passed
    assert r.grad_norm_ratio == pytest.approx(0.5, rel=TOL)
    assert report.weight_ratio_min == report.weight_ratio_max == 0.5
    assert "effective learning rate is ∝ 1/ga" in report.factor


@pytest.fixture(scope="module")
def verl_agg() -> Any:
    return pytest.importorskip("verl.trainer.ppo.core_algos").agg_loss


@pytest.mark.slow
@pytest.mark.parametrize(
    ("verl_mode", "mode"),
    [("token-mean", "token_mean"), ("seq-mean-token-mean", "seq_mean_token_mean")],
)
def test_verl_real_agg_loss_with_global_batch_info(verl_agg: Any, verl_mode: str, mode: str):
    batch = random_batch(3, n=8, t=6)
    info = {
        "dp_size": SPLIT.dp,
        "batch_num_tokens": float(batch.mask.sum()),  # all-reduced over the dp group
        "global_batch_size": float(batch.num_sequences),  # the mini-batch's rows
    }

    def verl(pt: Tensor, m: Tensor) -> Tensor:
        # the engine worker's mask is bool: |y_i| + 1e-8 is then int64 + 1e-8, a float32 that
        # rounds to |y_i| (docs/losses.md §3), as in training
        return verl_agg(loss_mat=pt, loss_mask=m.bool(), loss_agg_mode=verl_mode, **info)

    full = Aggregation(mode, count_empty_sequences=True)
    report = check_twin("verl", mode, verl, full)
    assert report.losses[0].passed and report.invariant


@pytest.mark.slow
def test_verl_legacy_real_agg_loss_without_batch_info(verl_agg: Any) -> None:
    # verl ≤ 0.6 dp_actor: agg_loss on the micro-batch alone, then / gradient_accumulation.
    def legacy(pt: Tensor, m: Tensor) -> Tensor:
        return verl_agg(loss_mat=pt, loss_mask=m, loss_agg_mode="token-mean") / SPLIT.ga

    report = check_twin("verl_legacy", "token_mean", legacy, Aggregation("token_mean"))
    assert not report.losses[0].passed


def test_openrlhf_real_aggregate_loss() -> None:
    pytest.importorskip("openrlhf")
    aggregate = openrlhf_api("openrlhf:ppo").loss.aggregate_loss
    n_total = float(random_batch(3, n=8, t=6).mask.sum())

    def openrlhf(pt: Tensor, m: Tensor) -> Tensor:
        # iter_grad_accum_global_norm: batch_num_tokens = the step's tokens / gas; DeepSpeed's
        # backward scales the loss by 1/gas
        loss = aggregate(pt, m, True, SPLIT.dp, n_total / SPLIT.ga)
        return loss / SPLIT.ga

    report = check_twin("openrlhf", "token_mean", openrlhf, Aggregation("token_mean"))
    assert report.losses[0].passed


def test_micro_batch_table_and_tolerance() -> None:
    batch = random_batch(3, n=8, t=6)
    report = split_report(
        batch,
        softmax_view(batch).logp,
        [get_loss("reinforce")],
        LossParams(),
        Aggregation("token_mean"),
        SPLIT,
        "trl:bnpo",
    )
    m = batch.mask
    assert [mb.tokens for mb in report.micro_batches] == [
        int(m[2 * j : 2 * j + 2].sum()) for j in range(4)
    ]
    n = float(m.sum())
    for mb in report.micro_batches:
        # bnpo: w = 1/(dp·ga·N_j) against 1/N: the ratio N/(4·N_j), one value per micro-batch
        assert mb.weight_ratio_min == pytest.approx(n / (4 * mb.tokens), rel=1e-15)
        assert mb.weight_ratio_max == mb.weight_ratio_min
    # float64 operands: 2·(K + 1)·u64 with K = 4
    assert report.tolerance == pytest.approx(2 * 5 * 2.0**-53)
