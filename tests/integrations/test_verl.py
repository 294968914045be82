"""The verl module (gradlens.integrations.verl) against the real verl.trainer.ppo.core_algos.

Loaded the way verl loads ``actor_rollout_ref.model.external_lib``; every wrapper must return
verl's own loss and gradient bit for bit, its c_t must be the autograd gradient of that loss,
and its metrics must equal verl's where verl computes the same thing, and autograd through the
logits where it does not. float64 throughout.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

F64 = torch.float64
pytestmark = pytest.mark.slow  # importing verl (ray, tensordict) alone takes 7–20 s here


@pytest.fixture(scope="module")
def verl() -> Any:
    pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.utils.import_utils import import_external_libs

    import_external_libs("gradlens.integrations.verl")  # what HFModelConfig.__post_init__ runs
    import verl.trainer.ppo.core_algos as core_algos

    return core_algos


def actor_config(**over: Any) -> Any:
    from verl.workers.config import ActorConfig, PolicyLossConfig

    values: dict[str, Any] = dict(
        strategy="fsdp",  # ActorConfig.__post_init__ insists on these three
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode="token-mean",
        policy_loss=PolicyLossConfig(**over.pop("policy_loss", {})),
        global_batch_info={},
    )
    return ActorConfig(**{**values, **over})


def batch(
    seed: int = 0, n: int = 6, t: int = 9, v: int = 50, drift: float = 1.2
) -> dict[str, Tensor]:
    """Logits z [n, t, v], log π(y) of sampled tokens, π_old drifted far enough to clip both
    ways (and past the dual clip c = 3), advantages of both signs and one zero group."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, t, v, generator=g, dtype=F64) * 2
    y = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) < 0.85
    mask[-1] = False  # an empty row
    adv = torch.randn(n, generator=g, dtype=F64)
    adv[1] = 0.0  # a group whose rewards were all equal
    logp = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    old = logp + drift * torch.randn(n, t, generator=g, dtype=F64)
    return {
        "z": z,
        "y": y,
        "mask": mask,
        "adv": adv[:, None].expand(n, t).clone(),
        "old": old.clamp(max=0),
    }


def test_importing_registers_a_wrapper_per_verl_loss(verl: Any) -> None:
    names = [n for n in verl.POLICY_LOSS_REGISTRY if not n.startswith("gradlens_")]
    assert len(names) >= 12 and "vanilla" in names
    for name in names:
        assert "gradlens_" + name in verl.POLICY_LOSS_REGISTRY
    from gradlens.integrations.verl import register_all

    assert register_all() == []  # idempotent


def test_every_wrapper_returns_verls_loss_and_gradient_and_the_exact_c(verl: Any) -> None:
    from gradlens.integrations.verl import last_call

    b = batch()
    m = b["mask"]
    for name in sorted(n for n in verl.POLICY_LOSS_REGISTRY if not n.startswith("gradlens_")):
        cfg = actor_config(policy_loss={"dro_beta": 0.1} if name == "dro" else {})
        out = []
        for fn in (name, "gradlens_" + name):
            torch.manual_seed(0)  # clip_cov draws a random permutation
            leaf = torch.log_softmax(b["z"], -1).gather(-1, b["y"][..., None])[..., 0]
            leaf = leaf.detach().requires_grad_(True)
            loss, metrics = verl.get_policy_loss_fn(fn)(
                b["old"], leaf, b["adv"], m.double(), loss_agg_mode="token-mean", config=cfg
            )
            (grad,) = torch.autograd.grad(loss, leaf)
            out.append((loss.detach(), grad, metrics))
        (l0, g0, m0), (l1, g1, m1) = out
        assert torch.equal(l0, l1) and torch.equal(g0, g1), name
        assert torch.equal(last_call["c"], g1), name  # c_t = ∂pg_loss/∂log_prob, by autograd
        assert {k: m1[k] for k in m0} == m0, name  # verl's own metrics untouched
        assert "gradlens/c_abs_max" in m1, name


def test_clip_shares_equal_verls_for_vanilla(verl: Any) -> None:
    # verl's vanilla counts its ε-clip (pg_clipfrac) and its dual clip (pg_clipfrac_lower) from
    # the ratio; gradlens counts the tokens whose c_t is exactly 0, split by the signs of A and
    # r − 1: the same tokens (A = 0 tokens have c = 0 too but fall in neither class)
    b = batch(drift=1.5)
    leaf = torch.log_softmax(b["z"], -1).gather(-1, b["y"][..., None])[..., 0].requires_grad_(True)
    _, metrics = verl.get_policy_loss_fn("gradlens_vanilla")(
        b["old"], leaf, b["adv"], b["mask"], loss_agg_mode="token-mean", config=actor_config()
    )
    assert metrics["actor/pg_clipfrac"] > 0.05 and metrics["actor/pg_clipfrac_lower"] > 0.01
    # verl's shares come back as float32 fractions k/n (n = 19 tokens here): within 2^-24 of ours
    assert metrics["gradlens/actor/pg_clipfrac"] == pytest.approx(
        metrics["actor/pg_clipfrac"], abs=6e-8
    )
    assert metrics["gradlens/actor/pg_clipfrac_lower"] == pytest.approx(
        metrics["actor/pg_clipfrac_lower"], abs=6e-8
    )
    n = int(b["mask"].sum())
    zero_adv = int((b["mask"] & (b["adv"] == 0)).sum())
    assert metrics["gradlens/zero_adv_frac"] == pytest.approx(zero_adv / n, abs=1e-15)


def test_logit_gradient_norms_are_autograds_through_the_logits(verl: Any) -> None:
    from gradlens.integrations.verl import sum_pi_squared

    b = batch(drift=0.3)
    m = b["mask"]
    z = b["z"].clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, b["y"][..., None])[..., 0]
    spi = (torch.softmax(b["z"], -1) ** 2).sum(-1)  # Σπ², as verl's calculate_sum_pi_squared
    fn = verl.get_policy_loss_fn("gradlens_vanilla")
    with sum_pi_squared(spi):
        loss, exact = fn(
            b["old"], logp, b["adv"], m, loss_agg_mode="token-mean", config=actor_config()
        )
    (gz,) = torch.autograd.grad(loss, z)  # ∂L/∂z [n, t, v] by autograd
    norms = gz.norm(dim=-1)[m]
    # float64: the closed form |c|·√(1 − 2π_y + Σπ²) against a norm over v = 50 entries,
    # both from the same softmax: agreement to a few ulps of the largest norm
    tol = 1e-12 * float(norms.max())
    assert exact["gradlens/logit_grad_norm_exact"] == 1.0
    assert abs(exact["gradlens/logit_grad_norm_max"] - float(norms.max())) <= tol
    assert abs(exact["gradlens/logit_grad_norm_mean"] - float(norms.mean())) <= tol
    adv = b["adv"][m]
    pos = float(norms[adv > 0].sum() / norms.sum())
    assert exact["gradlens/adv_pos_share"] == pytest.approx(pos, rel=1e-12)
    assert exact["gradlens/adv_pos_share"] + exact["gradlens/adv_neg_share"] == pytest.approx(1.0)
    # without Σπ²: the lower bound |c|(1 − π_y), and the true norm at most √2 times it
    leaf = logp.detach().requires_grad_(True)
    _, bound = fn(b["old"], leaf, b["adv"], m, loss_agg_mode="token-mean", config=actor_config())
    assert bound["gradlens/logit_grad_norm_exact"] == 0.0
    assert bound["gradlens/logit_grad_norm_max"] <= float(norms.max()) + tol
    assert float(norms.max()) <= 2**0.5 * bound["gradlens/logit_grad_norm_max"] + tol


def test_the_wrapper_runs_inside_verls_own_ppo_loss(verl: Any) -> None:
    # verl 0.9's engine-worker loss entry, with the batch in its no-padding layout
    tensordict = pytest.importorskip("tensordict")
    from verl.utils import tensordict_utils as tu

    from gradlens.integrations.verl import gradlens_ppo_loss, last_call

    b = batch(drift=0.3)
    mask = b["mask"]
    n, t = mask.shape
    p = 3  # prompt columns
    logp = torch.log_softmax(b["z"], -1).gather(-1, b["y"][..., None])[..., 0]
    leaf = logp.detach().requires_grad_(True)
    # the model's unpadded output: per sequence P + R_i values, the response's log-probs from
    # column P − 1 on (verl shifts by one)
    pieces = []
    for i in range(n):
        pieces.append(
            torch.cat([torch.zeros(p - 1, dtype=F64), leaf[i, mask[i]], torch.zeros(1, dtype=F64)])
        )
    # verl reads the response as its first R_i columns: give it a left-aligned mask
    lengths = mask.sum(-1)
    aligned = torch.arange(t)[None, :] < lengths[:, None]
    data = tensordict.TensorDict(
        {
            "prompts": torch.zeros(n, p, dtype=torch.long),
            "responses": torch.zeros(n, t, dtype=torch.long),
            "attention_mask": torch.cat(
                [torch.ones(n, p, dtype=torch.long), aligned.long()], dim=1
            ),
            "response_mask": aligned.long(),
            "old_log_probs": b["old"],
            "advantages": b["adv"],
        },
        batch_size=[n],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=n)
    cfg = actor_config(policy_loss={"loss_mode": "gradlens_vanilla"})
    loss, metrics = gradlens_ppo_loss(cfg, {"log_probs": torch.cat(pieces)}, data)
    assert last_call["inner"] == "vanilla"
    keys = [k for k in metrics if k.startswith("gradlens/")]
    assert "gradlens/c_abs_max" in keys and "gradlens/actor/pg_clipfrac" in keys
    (grad,) = torch.autograd.grad(loss, leaf)
    # the wrapper's c_t, on verl's left-aligned grid, is the whole gradient (no KL, no entropy)
    c = last_call["c"]
    assert float(grad[mask].abs().max()) > 0
    assert torch.equal(c[aligned], grad[mask])
