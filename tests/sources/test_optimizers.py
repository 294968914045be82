"""The stale steps' optimizers, written out, against torch.optim, and the rescaled last step.

Everything runs in float64 on a small two-layer network with a fixed loss; torch.optim is the
slow twin. Our updates use the same operations in the same order as torch.optim's single-tensor
implementations, so they agree to rounding (1e-14 relative: a few float64 roundings).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradlens.sources.optimizers import StaleOptimizer

TORCH = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr, foreach=False),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, foreach=False),
}


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(11, 5, dtype=torch.float64, generator=gen)
    return model(x).sin().sum()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("updates", [None, 3])  # 3: told the count, Adam keeps less state
@pytest.mark.parametrize("piece", [None, 7])  # 7 elements at a time: every weight in pieces
def test_each_optimizer_equals_torch_optim(kind, in_backward, updates, piece, monkeypatch):
    if piece is not None:
        monkeypatch.setattr("gradlens.sources.optimizers.PIECE", piece)
    ours, theirs = network(), network()
    opt = StaleOptimizer(list(ours.parameters()), kind, 1e-2, updates)
    ref = TORCH[kind](list(theirs.parameters()), 1e-2)
    for step in range(3):
        if in_backward:  # each parameter updated as its gradient completes
            with opt.in_backward():
                loss_of(ours, step).backward()
        else:
            loss_of(ours, step).backward()
            opt.step()
        ref.zero_grad()
        loss_of(theirs, step).backward()
        ref.step()
        assert all(p.grad is None for p in ours.parameters())  # freed after the update
        torch.testing.assert_close(flat(ours), flat(theirs), rtol=1e-14, atol=1e-14)
    assert not torch.equal(flat(ours), flat(network()))  # the steps moved something


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("updates", [None, 2, 3])  # the rescaled step is the last, or not
def test_rescaling_the_last_step_equals_taking_it_with_that_learning_rate(
    kind, updates, monkeypatch
):
    monkeypatch.setattr("gradlens.sources.optimizers.PIECE", 5)  # in pieces
    # Step 1 at lr 1e-2 for both; step 2 at lr 1e-2 then rescaled to 3e-3 against step 2 taken
    # at 3e-3 directly. The rescale recovers θ_1 from the state (adamw: also from the decay
    # factor 1 − lr·λ), so the two agree to a few roundings.
    rescaled, direct = network(), network()
    a = StaleOptimizer(list(rescaled.parameters()), kind, 1e-2, updates)
    b = StaleOptimizer(list(direct.parameters()), kind, 1e-2, updates)
    for opt, model in ((a, rescaled), (b, direct)):
        loss_of(model, 0).backward()
        opt.step()
    loss_of(rescaled, 1).backward()
    a.step()
    a.rescale(3e-3)
    b.lr = 3e-3
    loss_of(direct, 1).backward()
    b.step()
    torch.testing.assert_close(flat(rescaled), flat(direct), rtol=1e-12, atol=1e-14)
    assert a.lr == 3e-3


def test_rescale_touches_only_the_parameters_of_the_last_step():
    model = network()
    opt = StaleOptimizer(list(model.parameters()), "adam", 1e-2)
    loss_of(model, 0).backward()
    opt.step()
    first = copy.deepcopy(model[0].weight.detach())
    model[2](torch.ones(7, dtype=torch.float64)).sum().backward()  # only the last layer
    opt.step()
    opt.rescale(0.0)  # undoes the last step, which did not move the first layer
    torch.testing.assert_close(model[0].weight.detach(), first, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_rescaling_the_first_of_two_steps_reads_the_moments_rebuilt_from_g1(kind):
    # Told 2 updates, Adam keeps g_1 after the first; a redo of that step rebuilds m_1, v_1
    # from it. Against the step taken at 3e-3 directly, and then a second step on both.
    rescaled, direct = network(), network()
    a = StaleOptimizer(list(rescaled.parameters()), kind, 1e-2, 2)
    b = StaleOptimizer(list(direct.parameters()), kind, 3e-3, 2)
    loss_of(rescaled, 0).backward()
    a.step()
    a.rescale(3e-3)
    loss_of(direct, 0).backward()
    b.step()
    torch.testing.assert_close(flat(rescaled), flat(direct), rtol=1e-12, atol=1e-14)
    for opt, model in ((a, rescaled), (b, direct)):
        loss_of(model, 1).backward()
        opt.step()
    torch.testing.assert_close(flat(rescaled), flat(direct), rtol=1e-12, atol=1e-14)


def test_told_two_updates_adam_keeps_one_tensor_per_parameter_between_them():
    model = network()
    opt = StaleOptimizer(list(model.parameters()), "adam", 1e-2, 2)
    sizes = []
    for step in range(2):
        loss_of(model, step).backward()
        opt.step()
        sizes.append(sum(t.numel() for s in opt.state.values() for t in s.values()))
    weights = sum(p.numel() for p in model.parameters())
    assert sizes == [weights, weights]  # g_1, then u_2 (not m and v: twice the weights)
    loss_of(model, 2).backward()
    with pytest.raises(RuntimeError, match="last update"):
        opt.step()  # a third update was not announced: its moments are gone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_first_moments_are_the_bits_adams_updates_of_zero_give(dtype):
    # m_1, v_1 are formed straight from g (no zeros written first): the bits lerp_ and
    # addcmul_ give on m = v = 0, over magnitudes down to the subnormal range and signed zeros.
    from gradlens.sources.optimizers import BETAS, Scratch, _from_zero

    g = torch.randn(1 << 16, dtype=torch.float64) * torch.logspace(-40, 12, 1 << 16).double()
    g = torch.cat([g, torch.tensor([0.0, -0.0], dtype=torch.float64)]).to(dtype)
    work = Scratch(*(torch.empty(g.numel(), dtype=dtype) for _ in range(4)))
    m, v = _from_zero(g, work)
    expected_m = torch.zeros_like(g).lerp_(g, 1 - BETAS[0])
    expected_v = torch.zeros_like(g).mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    assert torch.equal(m, expected_m) and torch.equal(v, expected_v)
