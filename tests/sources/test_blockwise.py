"""The block-at-a-time backward equals autograd through the whole graph, for several losses.

A toy causal LM (an embedding, a list of blocks that take keyword arguments as the
transformers blocks do, a final norm): K losses' gradients of every parameter from
`taped_blocks` + `backward_blocks` against one ``torch.autograd.grad`` per loss through the
whole graph, in float64. Both compute the same products in the same order within a block, so
they agree to rounding (1e-12 relative is generous for two layers).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gradlens.sources.blockwise import (
    BlockwiseUnsupported,
    backward_blocks,
    check_cut,
    replayed_blocks,
    taped_blocks,
)
from gradlens.sources.forward import checkpointed_blocks

H, V, N, L = 6, 11, 3, 5


class Block(nn.Module):
    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.gate = nn.Linear(H, H, bias=False)
        self.tuple_out = tuple_out

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor | tuple[Tensor, None]:
        y = x + torch.tanh(self.lin(x)) * torch.sigmoid(self.gate(x)) * scale
        return (y, None) if self.tuple_out else y


class Toy(nn.Module):
    def __init__(self, tuple_out: bool = False, shared: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Block(tuple_out) for _ in range(3)])
        if shared:
            self.layers[2].gate = self.layers[0].gate
        self.norm = nn.LayerNorm(H)
        self.scale_param = None

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        scale = torch.linspace(0.5, 1.5, H, dtype=x.dtype)
        for block in self.layers:
            out = block(x, scale=scale)
            x = out if isinstance(out, Tensor) else out[0]
        return self.norm(x)


def losses_of(h: Tensor, head: Tensor, ids: Tensor) -> list[Tensor]:
    logp = torch.log_softmax(h @ head.T, -1).gather(-1, ids[..., None])[..., 0]
    weights = torch.linspace(-1.0, 2.0, L, dtype=h.dtype)
    return [-logp.mean(), (weights * logp).sum(), (logp.exp() * weights).sum()]


@pytest.mark.parametrize("tuple_out", [False, True])
@pytest.mark.parametrize("replay", [False, True])  # the blocks' forward recorded earlier
def test_block_at_a_time_equals_the_whole_graph(tuple_out, replay):
    torch.manual_seed(0)
    model = Toy(tuple_out).double().eval()
    head = torch.randn(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, (N, L))
    params = list(model.parameters())

    expected = []
    for loss in losses_of(model(ids), head, ids):
        expected.append(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))

    if replay:  # a forward without autograd records; the gradients' forward replays it
        with torch.no_grad(), taped_blocks(model) as recorded:
            model(ids)
        with replayed_blocks(model, recorded) as tape:
            h = model(ids)
        assert tape.inputs is recorded.inputs and tape.exit is not recorded.exit
    else:
        with taped_blocks(model) as tape:
            h = model(ids)
    losses = losses_of(h, head, ids)
    assert len(tape.inputs) == 3 and tape.exit is not None and tape.exit.is_leaf
    outside = [p for p in params if not any(p is q for b in model.layers for q in b.parameters())]
    cot, got = [], [dict() for _ in losses]
    for k, loss in enumerate(losses):
        g = torch.autograd.grad(loss, [tape.exit, *outside], retain_graph=True, allow_unused=True)
        cot.append(g[0])
        got[k].update({id(p): gp for p, gp in zip(outside, g[1:], strict=True) if gp is not None})

    def receive(k: int, p: nn.Parameter, g: Tensor) -> None:
        assert id(p) not in got[k], "a block parameter's gradient is handed over once per loss"
        got[k][id(p)] = g

    at_entry = backward_blocks(tape, cot, receive)
    for k, g in enumerate(at_entry):
        (ge,) = torch.autograd.grad(tape.entry, [model.embed.weight], g, retain_graph=True)
        got[k][id(model.embed.weight)] = got[k].get(id(model.embed.weight), 0) + ge
    for k in range(len(losses)):
        for p, e in zip(params, expected[k], strict=True):
            assert e is not None
            torch.testing.assert_close(got[k][id(p)], e, rtol=1e-12, atol=1e-14)


def test_the_taped_forward_keeps_no_block_graph():
    torch.manual_seed(0)
    model = Toy().double().eval()
    ids = torch.randint(0, V, (N, L))
    with taped_blocks(model) as tape:
        h = model(ids)
    # the graph reaches the last block's output leaf and the norm, not the blocks' weights
    (g,) = torch.autograd.grad(h.sum(), [tape.exit])
    assert g.shape == (N, L, H)
    assert all(x[0][0].grad_fn is None for x in tape.inputs)
    assert "forward" not in vars(model.layers[0])  # the wrapper is gone after the block


def test_a_replay_runs_no_block_and_gives_the_recorded_output():
    torch.manual_seed(0)
    model = Toy().double().eval()
    ids = torch.randint(0, V, (N, L))
    with torch.no_grad(), taped_blocks(model) as recorded:
        plain = model(ids)
    calls = []
    for block in model.layers:  # a hook inside the block: it fires when the block computes
        block.lin.register_forward_pre_hook(lambda *_: calls.append(1))
    with replayed_blocks(model, recorded) as tape:
        h = model(ids)
    assert calls == []  # the blocks' own forward never ran
    assert torch.equal(h.detach(), plain) and h.requires_grad and tape.entry.requires_grad


def test_a_replay_refuses_other_parameters_inputs_or_models():
    torch.manual_seed(0)
    model = Toy().double().eval()
    ids = torch.randint(0, V, (N, L))
    with torch.no_grad(), taped_blocks(model) as recorded:
        model(ids)
    with (
        pytest.raises(BlockwiseUnsupported, match="not the recorded one"),
        replayed_blocks(model, recorded),
    ):
        model((ids + 1) % V)  # other tokens: the first block gets another input
    with (
        pytest.raises(BlockwiseUnsupported, match="another model"),
        replayed_blocks(Toy().double().eval(), recorded),
    ):
        pass
    with torch.no_grad():
        model.layers[1].lin.weight.mul_(1.0)  # written (to the same values): a new version
    with (
        pytest.raises(BlockwiseUnsupported, match="has been written"),
        replayed_blocks(model, recorded),
    ):
        pass
    assert "forward" not in vars(model.layers[0])  # nothing left replaced


def test_a_parameter_shared_by_two_blocks_cannot_be_cut():
    with pytest.raises(BlockwiseUnsupported, match="shared across the cut"):
        check_cut(Toy(shared=True))


def test_a_block_argument_that_depends_on_a_parameter_cannot_be_cut():
    model = Toy().double().eval()
    model.scale_param = nn.Parameter(torch.ones(H, dtype=torch.float64))

    def forward(ids: Tensor) -> Tensor:
        x = model.embed(ids)
        for block in model.layers:
            x = block(x, scale=model.scale_param)
        return model.norm(x)

    with pytest.raises(BlockwiseUnsupported, match="depends on a parameter"), taped_blocks(model):
        forward(torch.zeros(1, 2, dtype=torch.long))


def test_a_block_that_receives_a_cache_cannot_be_cut():
    # a recomputation would append to the cache: the taped forward refuses it
    model = Toy().double().eval()

    def forward(ids: Tensor) -> Tensor:
        x = model.embed(ids)
        for block in model.layers:
            x = block(x, scale=torch.ones(H, dtype=x.dtype), past_key_values=object())
        return x

    with pytest.raises(BlockwiseUnsupported, match="key-value cache"), taped_blocks(model):
        forward(torch.zeros(1, 2, dtype=torch.long))


def test_a_forward_set_on_the_instance_is_given_back_after_either_wrapper():
    # accelerate's device placement replaces a module's forward on the instance; taping or
    # checkpointing the blocks must leave that function in place afterwards
    model = Toy().double().eval()
    calls = []
    hooked = model.layers[1]
    plain = hooked.forward

    def placed(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    hooked.forward = placed
    ids = torch.zeros(1, 2, dtype=torch.long)
    with taped_blocks(model):
        model(ids)
    with checkpointed_blocks(model) as found:
        assert found
        model(ids).sum().backward()
    assert vars(hooked)["forward"] is placed
    assert "forward" not in vars(model.layers[0])
    before = len(calls)
    model(ids)
    assert len(calls) == before + 1  # the instance's function still runs
    assert before == 3  # taped (1), checkpointed forward and its recomputation (2)


def test_an_operation_between_two_blocks_cannot_be_cut():
    # x_i must be exactly what B_i returned: a scaling between blocks would be skipped by the
    # cotangent handed from block to block
    model = Toy().double().eval()

    def forward(ids: Tensor) -> Tensor:
        x = model.embed(ids)
        for block in model.layers:
            x = 2.0 * block(x, scale=torch.ones(H, dtype=x.dtype))
        return model.norm(x)

    with pytest.raises(BlockwiseUnsupported, match="between blocks"), taped_blocks(model):
        forward(torch.zeros(1, 2, dtype=torch.long))
