"""Distribution-level distillation (gradlens.losses.distill): the dense logit gradient in closed
form against torch.autograd in float64, for every divergence × form × teacher × aggregation, the
zero-sum property, a hand-computed case, and TRL's and verl's own functions where installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from helpers import make_batch, random_batch, rel_err, with_teacher

from gradlens.containers import Batch, Teacher
from gradlens.errors import GradlensError
from gradlens.grads import autograd_reference, closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss
from gradlens.losses.base import Distill
from gradlens.losses.distill import DIVERGENCES, FORMS, TeacherTokens, divergence_grad

# float64: closed form and autograd evaluate the same sums in a different order: a few ulps
# times the number of summed terms (~1e-15 here); 1e-12 leaves a wide margin while a wrong sign
# or a missing term is O(1).
TOL_F64 = 1e-12
SEED = 5

CASES = [
    (div, form, stored)
    for div in DIVERGENCES
    for form in FORMS
    for stored in (False, True)
    if not (form == "full" and stored)  # stored top-k log-probs give the top-k form only
]


def teacher_batch(stored: bool = False) -> Batch:
    return with_teacher(random_batch(SEED, n=6, t=5, v=11, h=7, drift=0.5), SEED, stored=stored)


def distill(div: str, form: str, **kw: float | None) -> LossParams:
    return LossParams(distill=Distill(divergence=div, form=form, top_k=4, coef=0.7, **kw))  # type: ignore[arg-type]


def both(batch: Batch, loss: str, params: LossParams, mode: str = "token_mean"):  # type: ignore[no-untyped-def]
    agg = Aggregation(mode, 7.0 if mode.endswith("_norm") else None)
    spec = get_loss(loss)
    return closed_form(batch, softmax_view(batch), spec, params, agg), autograd_reference(
        batch, spec, params, agg
    )


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("div, form, stored", CASES)
def test_closed_form_matches_autograd_float64(div: str, form: str, stored: bool, mode: str) -> None:
    batch = teacher_batch(stored)
    closed, ref = both(batch, "ppo_clip", distill(div, form, beta=0.3), mode)
    assert closed.distill_grad_logits is not None
    assert float(closed.distill_grad_logits.abs().max()) > 1e-3  # the term is not vacuous
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    m = batch.mask
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64  # c_t: policy part only
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_clamp_and_entropy_bonus_together(div: str) -> None:
    # verl's floor −2 holds some student log-probs (V = 11: many entries lie below −2), and the
    # entropy bonus's dense term adds to the distillation term's.
    batch = teacher_batch()
    params = dataclasses.replace(distill(div, "top_k", log_prob_min_clamp=-2.0), entropy_coef=0.1)
    view = softmax_view(batch)
    assert bool((view.probs.log() < -2.0).any())
    closed, ref = both(batch, "sft", params)
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64)


@pytest.mark.parametrize("div, form, stored", CASES)
def test_zero_sum(div: str, form: str, stored: bool) -> None:
    # Σ_v ∂D_t/∂z_tv = Σψ − Σπ·Σψ = 0: float64 rounding of |u| ≲ 1 summed over V = 11.
    batch = teacher_batch(stored)
    closed, _ = both(batch, "reinforce", distill(div, form, beta=0.6))
    assert closed.distill_grad_logits is not None
    assert float(closed.distill_grad_logits.sum(-1).abs().max()) < 1e-14
    assert float(closed.grad_logits.sum(-1).abs().max()) < 1e-14


def test_forward_kl_is_zero_at_the_teacher() -> None:
    # With q = π the full forward KL and its gradient π − q vanish (up to rounding).
    batch = teacher_batch()
    assert batch.teacher is not None
    teacher = dataclasses.replace(batch.teacher, hidden=batch.hidden, weight=batch.weight)
    closed, _ = both(
        dataclasses.replace(batch, teacher=teacher), "reinforce", distill("forward_kl", "full")
    )
    assert closed.distill_grad_logits is not None
    assert float(closed.distill_grad_logits.abs().max()) < 1e-15


def test_hand_computed_top_k_forward_kl() -> None:
    # One token, V = 3, π = [0.5, 0.3, 0.2] (z = log π), teacher top-2 K = {0, 2} with
    # q = [0.6, ·, 0.3] (stored, not renormalised: Σ_K q = 0.9).
    #   D = 0.6·log(0.6/0.5) + 0.3·log(0.3/0.2) = 0.6·0.1823216 + 0.3·0.4054651 = 0.2310325
    #   ∂D/∂z_v = π_v·Σ_K q − q_v·1[v∈K]:
    #     v=0: 0.5·0.9 − 0.6 = −0.15;  v=1: 0.3·0.9 = 0.27;  v=2: 0.2·0.9 − 0.3 = −0.12
    #   (sum: −0.15 + 0.27 − 0.12 = 0)
    log_pi = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    teacher = TeacherTokens(
        ids=torch.tensor([[0, 2]]), logp=torch.tensor([[0.6, 0.3]], dtype=torch.float64).log()
    )
    value, grad, _ = divergence_grad(log_pi, teacher, Distill("forward_kl", "top_k"))
    expected_value = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.2)
    assert float(value[0]) == pytest.approx(expected_value, rel=1e-15)
    assert float(value[0]) == pytest.approx(0.2310325, abs=1e-7)
    assert grad[0].tolist() == pytest.approx([-0.15, 0.27, -0.12], abs=1e-15)


def test_jsd_endpoints_are_trl_s_kls() -> None:
    # TRL takes β = 0 and 1 to be forward and reverse KL (not the formula's limits, both 0).
    batch = teacher_batch()
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd, _ = both(batch, "reinforce", distill("jsd", "full", beta=beta))
        kl, _ = both(batch, "reinforce", distill(div, "full"))
        assert jsd.loss == kl.loss
        assert torch.equal(jsd.grad_logits, kl.grad_logits)


def test_missing_teacher_and_full_form_from_stored_are_errors() -> None:
    batch = random_batch(SEED)
    with pytest.raises(GradlensError, match=r"loss\.distill needs a teacher"):
        both(batch, "reinforce", distill("forward_kl", "full"))
    with pytest.raises(GradlensError, match=r"loss\.distill\.form: 'full'"):
        both(teacher_batch(stored=True), "reinforce", distill("forward_kl", "full"))


# ----------------------------------------------------------------------------- the frameworks


def student_teacher_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 9, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, 9, generator=gen, dtype=torch.float64),
    )


def gradlens_dense(
    student: torch.Tensor, teacher: TeacherTokens, d: Distill
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_t, ∂D_t/∂z_t) on flattened tokens."""
    log_probs = torch.log_softmax(student.reshape(-1, student.shape[-1]), dim=-1)
    value, grad, _ = divergence_grad(log_probs, teacher, d)
    return value, grad


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_trl_generalized_jsd_loss(beta: float) -> None:
    pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher_logits = student_teacher_logits()
    z = student.clone().requires_grad_(True)
    loss = GKDTrainer.generalized_jsd_loss(z, teacher_logits, beta=beta, reduction="sum")
    loss.backward()
    assert z.grad is not None
    teacher = TeacherTokens(log_probs=torch.log_softmax(teacher_logits.reshape(-1, 9), dim=-1))
    value, grad = gradlens_dense(student, teacher, Distill("jsd", "full", beta=beta))
    # float64 both ways; TRL sums F.kl_div's terms, gradlens the same terms in closed form
    assert float(value.sum()) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert rel_err(grad, z.grad.reshape(-1, 9)) <= 1e-12


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl not installed")
@pytest.mark.parametrize("clamp", [None, -2.0])
def test_verl_forward_kl_topk(clamp: float | None) -> None:
    from verl.trainer.distillation.fsdp import losses as verl_losses
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    student, teacher_logits = student_teacher_logits(1)
    top = torch.topk(torch.log_softmax(teacher_logits, dim=-1), 4, dim=-1)
    z = student.clone().requires_grad_(True)
    config = DistillationConfig(
        distillation_loss=DistillationLossConfig(
            loss_mode="forward_kl_topk", topk=4, log_prob_min_clamp=clamp, use_policy_gradient=False
        )
    )

    def nested(values: torch.Tensor) -> torch.Tensor:  # verl's THD layout: one jagged sequence
        return torch.nested.nested_tensor([values], layout=torch.jagged)

    out = verl_losses.compute_forward_kl_topk(
        student_logits=z.reshape(1, 8, 9),
        teacher_topk_log_probs=nested(top.values.reshape(8, 4)),
        teacher_topk_ids=nested(top.indices.reshape(8, 4)),
        config=config,
        data_format="thd",
    )
    per_token = out["distillation_losses"].reshape(-1)
    per_token.sum().backward()
    assert z.grad is not None
    teacher = TeacherTokens(ids=top.indices.reshape(8, 4), logp=top.values.reshape(8, 4))
    d = Distill("forward_kl", "top_k", log_prob_min_clamp=clamp)
    value, grad = gradlens_dense(student, teacher, d)
    # verl computes the KL in float32 (kl_divergence casts), hence float32 rounding: ~1e-7
    assert rel_err(value, per_token.detach().double()) <= 1e-6
    assert rel_err(grad, z.grad.reshape(-1, 9)) <= 1e-6


# ----------------------------------------------------------------------------- on-policy form


def test_opd_is_reinforce_with_the_teacher_advantage() -> None:
    # opd: c_t = a_t·(ℓ_t − ℓ^T_t), the c-form of REINFORCE with A = sg(ℓ^T − ℓ); token_mean
    # weights a_t = 1/M. Against autograd in float64, and against REINFORCE given that A.
    batch = teacher_batch()
    assert batch.teacher is not None and batch.teacher.sampled_logp is not None
    closed, ref = both(batch, "opd", LossParams())
    view = softmax_view(batch)
    m = batch.mask
    expected = (view.logp - batch.teacher.sampled_logp) / batch.num_tokens
    assert rel_err(closed.coefficient[m], expected[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    adv = torch.where(m, batch.teacher.sampled_logp - view.logp, 0.0)
    reinforce, _ = both(dataclasses.replace(batch, advantages=adv), "reinforce", LossParams())
    assert rel_err(closed.grad_weight, reinforce.grad_weight) <= TOL_F64


def test_opd_hand_computed() -> None:
    # One token, V = 2, z = [log 0.8, log 0.2], y = 0: ℓ = log 0.8; teacher log q(y) = log 0.4.
    #   g = ℓ − ℓ^T = log(0.8/0.4) = log 2 = 0.6931472 (one token: a = 1)
    #   ∂L/∂z = g·(e_y − π) = 0.6931472·[0.2, −0.2] = [0.1386294, −0.1386294]

    weight = torch.tensor([[math.log(0.8)], [math.log(0.2)]], dtype=torch.float64)
    batch = make_batch(
        torch.ones(1, 1, 1, dtype=torch.float64), weight, torch.tensor([[0]]), torch.ones(1, 1)
    )
    teacher = Teacher(sampled_logp=torch.tensor([[math.log(0.4)]], dtype=torch.float64))
    closed, _ = both(dataclasses.replace(batch, teacher=teacher), "opd", LossParams())
    assert float(closed.coefficient[0, 0]) == pytest.approx(math.log(2), rel=1e-14)
    assert closed.grad_logits[0].tolist() == pytest.approx([0.1386294, -0.1386294], abs=1e-7)
