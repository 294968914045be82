"""Replaying the rollout's top-p/top-k kept sets K_t (``loss.sampling_support: kept``).

Every logit path uses π̃_t = π_t on K_t, renormalised: the closed form c_t(e_y − π̃_t) against
autograd of an independently written log π̃ (float64, 1e-10), rows outside K_t exactly 0, the
streamed engine against the materialized one, the sampler's kept prefix and the stored
log-probs' shift by hand.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import F64, PI, make_batch, random_kept, three_policy_batch

from gradlens.config import validate
from gradlens.containers import Batch, KeptSets, valid_index
from gradlens.diagnostics.support import support_report
from gradlens.engine.streamed import EnginePlan, lm_head_pass
from gradlens.errors import GradlensError
from gradlens.grads import (
    autograd_reference,
    closed_form,
    entropy_bonus,
    objective,
    on_grid,
    replay,
    softmax_view,
)
from gradlens.logits import kept_entries
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.sources.rollout import kept_prefix, prefix_ids

LOSSES = ["reinforce", "ppo_clip", "grpo", "sft", "cispo"]


def kept_batch(seed: int) -> Batch:
    batch = three_policy_batch(seed)
    return dataclasses.replace(batch, kept=random_kept(batch, seed))


def twin(batch: Batch, loss: str, params: LossParams):
    """Autograd of the objective with log π̃ written independently of gradlens's logit path:
    token by token, only the kept logits z[K_t] enter, log π̃(y) = z_y − logsumexp(z[K_t]) and
    H̃ = −Σ_K π̃ log π̃; returns (∂L/∂z [M, V], ∂L/∂W [V, H])."""
    rows, cols = valid_index(batch.mask)
    weight = batch.weight.detach().clone().requires_grad_(True)
    z = batch.hidden[rows, cols] @ weight.T  # [M, V]
    z.retain_grad()
    assert batch.kept is not None
    logps, entropies = [], []
    for m in range(z.shape[0]):
        ids = [int(i) for i in batch.kept.ids[rows[m], cols[m]] if i >= 0]
        y = ids.index(int(batch.tokens[rows[m], cols[m]]))
        log_tilde = torch.log_softmax(z[m, ids], -1)  # [|K_t|]
        logps.append(log_tilde[y])
        entropies.append(-(log_tilde.exp() * log_tilde).sum())
    logp = on_grid(torch.stack(logps), rows, cols, batch.mask.shape)
    obj = objective(batch, logp, get_loss(loss), params, Aggregation())
    value = obj.loss
    if params.entropy_coef != 0.0:
        h = on_grid(torch.stack(entropies), rows, cols, batch.mask.shape)
        value = value + entropy_bonus(obj.agg_weights, h, params.entropy_coef)
    value.backward()
    assert z.grad is not None and weight.grad is not None
    return z.grad, weight.grad


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05], ids=["plain", "entropy"])
@pytest.mark.parametrize("loss", LOSSES)
def test_replayed_closed_form_is_autograd_of_the_renormalised_log_softmax(loss, entropy_coef):
    batch = replay(kept_batch(3))
    params = LossParams(entropy_coef=entropy_coef)
    view = softmax_view(batch)
    keep_v = kept_entries(batch.kept.valid_ids(view.rows, view.cols), 0, batch.vocab_size)
    grads = closed_form(batch, view, get_loss(loss), params, Aggregation())
    ref_logits, ref_weight = twin(batch, loss, params)
    own = autograd_reference(batch, get_loss(loss), params, Aggregation())
    # float64 throughout; the two paths differ in operation order only (a few hundred ulps of
    # sums over V = 13 entries), far below 1e-10
    scale = float(ref_logits.abs().max())
    assert float((grads.grad_logits - ref_logits).abs().max()) <= 1e-10 * scale
    assert float((grads.grad_weight - ref_weight).abs().max()) <= 1e-10 * float(
        ref_weight.abs().max()
    )
    # outside K_t the rows are exactly 0, in both
    assert bool((grads.grad_logits[~keep_v] == 0).all())
    assert bool((ref_logits[~keep_v] == 0).all())
    assert bool((own.grad_logits[~keep_v] == 0).all())  # gradlens's own autograd reference
    assert float((own.grad_logits - ref_logits).abs().max()) <= 1e-10 * scale
    # still zero-sum per token: Σ_v c(e_y − π̃)_v = c(1 − Σ π̃) = rounding of 13 terms
    assert float(grads.grad_logits.sum(-1).abs().max()) <= 1e-14 * max(scale, 1.0) * 13
    assert keep_v.sum() < keep_v.numel()  # the test restricts something


def test_unreplayed_batch_ignores_the_kept_sets():
    batch = kept_batch(4)
    full = dataclasses.replace(batch, kept=None)
    a = closed_form(batch, softmax_view(batch), get_loss("ppo_clip"), LossParams(), Aggregation())
    b = closed_form(full, softmax_view(full), get_loss("ppo_clip"), LossParams(), Aggregation())
    assert torch.equal(a.grad_logits, b.grad_logits)


def test_replay_by_hand():
    # One token, π = [0.5, 0.2, 0.15, 0.1, 0.05] (z = log π), y = 1, K = {0, 1, 2}: S = 0.85.
    # π̃ = [0.5, 0.2, 0.15, 0, 0]/0.85 = [0.588235, 0.235294, 0.176471, 0, 0];
    # ℓ̃ = log(0.2/0.85) = −1.446919. REINFORCE with A = 1 over one token: c = −1, so
    # ∂L/∂z = −(e_1 − π̃) = [0.588235, −0.764706, 0.176471, 0, 0].
    # Stored ℓ_old = log 0.2, log S_old = log 0.8 → ℓ̃_old = log(0.2/0.8) = log 0.25;
    # ℓ_μ = log 0.25, log S^μ = log 0.5 → log μ̃ = log 0.5.
    v = len(PI)
    weight = torch.eye(v, dtype=F64)
    hidden = torch.tensor(PI, dtype=F64).log().view(1, 1, v)
    tokens = torch.tensor([[1]])
    mask = torch.tensor([[True]])
    batch = make_batch(
        hidden,
        weight,
        tokens,
        mask,
        old_logp=torch.tensor([[math.log(0.2)]], dtype=F64),
        rollout_logp=torch.tensor([[math.log(0.25)]], dtype=F64),
    )
    kept = KeptSets(
        torch.tensor([[[0, 1, 2, -1]]]),
        "by hand",
        old_log_mass=torch.tensor([[math.log(0.8)]], dtype=F64),
        rollout_log_mass=torch.tensor([[math.log(0.5)]], dtype=F64),
    )
    replayed = replay(dataclasses.replace(batch, kept=kept))
    assert float(replayed.old_logp[0, 0]) == pytest.approx(math.log(0.25), abs=1e-15)
    assert float(replayed.rollout_logp[0, 0]) == pytest.approx(math.log(0.5), abs=1e-15)
    view = softmax_view(replayed)
    assert float(view.logp[0, 0]) == pytest.approx(math.log(0.2 / 0.85), abs=1e-14)
    grads = closed_form(replayed, view, get_loss("reinforce"), LossParams(), Aggregation())
    expected = torch.tensor([[0.5 / 0.85, 0.2 / 0.85 - 1, 0.15 / 0.85, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(grads.grad_logits, expected, rtol=0, atol=1e-15)
    assert grads.grad_logits[0, 3] == 0 and grads.grad_logits[0, 4] == 0


def test_replay_needs_kept_sets_that_hold_the_sampled_tokens():
    batch = three_policy_batch(5)
    with pytest.raises(GradlensError, match="sampling_support"):
        replay(batch)
    kept = random_kept(batch, 5)
    ids = kept.ids.clone()
    ids[batch.tokens[..., None] == ids] = -1  # drop y_t from every K_t
    with pytest.raises(GradlensError, match="outside their kept set"):
        replay(dataclasses.replace(batch, kept=dataclasses.replace(kept, ids=ids)))


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05], ids=["plain", "entropy"])
@pytest.mark.parametrize(
    "engine_plan",
    [EnginePlan(vocab_chunk=4, resident=0), EnginePlan(vocab_chunk=5, resident=2)],
    ids=["streamed", "partly-resident"],
)
def test_streamed_engine_replays_as_the_materialized_one(engine_plan, entropy_coef):
    batch = replay(kept_batch(6))
    params = LossParams(entropy_coef=entropy_coef)
    view = softmax_view(batch)
    agg = Aggregation()
    specs = [get_loss(n) for n in LOSSES]

    def coefficients(logp_valid: torch.Tensor) -> list[torch.Tensor]:
        logp = on_grid(logp_valid, view.rows, view.cols, batch.mask.shape)
        return [
            objective(batch, logp, s, params, agg).coefficient[view.rows, view.cols] for s in specs
        ]

    weight_e = None
    if entropy_coef:
        weight_e = entropy_coef * agg.weights(batch.mask, F64)[view.rows, view.cols]
    res = lm_head_pass(
        view.hidden,
        batch.weight,
        view.tokens,
        coefficients,
        engine_plan,
        entropy_weight=weight_e,
        kept_ids=batch.kept.valid_ids(view.rows, view.cols),
    )
    # float64; only the chunked summation order differs: 1e-12 relative is thousands of ulps
    assert torch.allclose(res.tokens.logp, view.logp[view.rows, view.cols], rtol=0, atol=1e-12)
    assert torch.allclose(res.tokens.entropy, view.entropy, rtol=0, atol=1e-12)
    assert torch.allclose(res.tokens.prob_sum, torch.ones_like(res.tokens.prob_sum), atol=1e-12)
    for spec, rows in zip(specs, res.rows, strict=True):
        ref = closed_form(batch, view, spec, params, agg)
        expected = ref.grad_weight.norm(dim=1)
        assert float((rows.norms - expected).abs().max()) <= 1e-12 * float(expected.max())
        assert float(rows.row_sum.norm()) <= 1e-12 * float(ref.grad_weight.norm())


def test_kept_prefix_by_hand():
    probs = torch.tensor([PI, PI[::-1]], dtype=F64)  # the second row sorted the other way
    # top-p 0.8: masses ranked above = 0, 0.5, 0.7, 0.85, ...: the first 3 are < 0.8
    order, count = kept_prefix(probs, 0.8, 0)
    assert count.tolist() == [3, 3]
    assert order[1, :3].tolist() == [4, 3, 2]
    # top-p 0.7: 0, 0.5 < 0.7 but 0.7 is not < 0.7: 2 kept
    assert kept_prefix(probs, 0.7, 0)[1].tolist() == [2, 2]
    # top-k 2, no top-p
    assert kept_prefix(probs, 1.0, 2)[1].tolist() == [2, 2]
    # top-k 4 then top-p 0.8 over the renormalised 4: /0.95 → 0.526, 0.211, 0.158, 0.105;
    # ranked above: 0, 0.526, 0.737, 0.895 → 3 kept
    assert kept_prefix(probs, 0.8, 4)[1].tolist() == [3, 3]
    # top-k 4 then top-p 0.75: 0.737 < 0.75 still: 3; top-p 0.7: 0.737 ≥ 0.7: 2
    assert kept_prefix(probs, 0.7, 4)[1].tolist() == [2, 2]
    ids = prefix_ids(order, torch.tensor([3, 1]), 3)
    assert ids.tolist() == [[0, 1, 2], [4, -1, -1]]


def test_support_report_by_hand():
    # The one token of test_replay_by_hand: S^θ = 0.85, log S^θ = −0.162519; on-policy
    # (ℓ_old = ℓ = log 0.2) with S^old = 0.85 recorded, so r̃ = r = 1. The sampler: μ̃ = 0.5
    # stored with log S^μ = 0 → π_θ/μ̃ = 0.2/0.5 = 0.4 (A = 1 > 0, not clipped: the lower
    # bound acts on A < 0 only), π̃_θ/μ̃ = 0.235294/0.5 = 0.470588.
    v = len(PI)
    batch = make_batch(
        torch.tensor(PI, dtype=F64).log().view(1, 1, v),
        torch.eye(v, dtype=F64),
        torch.tensor([[1]]),
        torch.tensor([[True]]),
        rollout_logp=torch.tensor([[math.log(0.5)]], dtype=F64),
    )
    kept = KeptSets(
        torch.tensor([[[0, 1, 2]]]),
        "by hand",
        old_log_mass=torch.tensor([[math.log(0.85)]], dtype=F64),
    )
    report = support_report(dataclasses.replace(batch, kept=kept), kept, False, 0.2, 0.28)
    assert report.kept_mean == 3 and report.mass_mean == pytest.approx(0.85, abs=1e-14)
    assert report.log_mass_mean == pytest.approx(math.log(0.85), abs=1e-14)
    policy, sampler = report.ratios
    assert policy.mean_full == pytest.approx(1.0, abs=1e-14)
    assert policy.mean_kept == pytest.approx(1.0, abs=1e-14)
    assert sampler.mean_full == pytest.approx(0.4, abs=1e-14)
    assert sampler.mean_kept == pytest.approx(0.2 / 0.85 / 0.5, abs=1e-14)
    assert sampler.clipfrac_full == 0.0
    # with A = −1 the sampler ratio 0.4 < 1 − 0.2 is clipped, and so is 0.47
    negative = dataclasses.replace(batch, advantages=-batch.advantages, kept=kept)
    _, sampler = support_report(negative, kept, False, 0.2, 0.28).ratios
    assert sampler.clipfrac_full == 1.0 and sampler.clipfrac_kept == 1.0


def test_config_refuses_engines_that_cannot_replay():
    settings = {"diagnostics": {"engine": "fused"}}
    with pytest.raises(GradlensError, match=r"sampling_support 'kept'.*fused"):
        validate({"loss": {"sampling_support": "kept"}, **settings})
    validate({"loss": {"sampling_support": "full"}, **settings})  # fine without replay
    # the vocab-parallel engine replays (tests/engine/test_vocab_parallel.py)
    validate({"loss": {"sampling_support": "kept"}, "diagnostics": {"tensor_parallel": 2}})
