"""The stale steps' backward in a lower precision (gradlens.sources.autocast_recompute).

The claims: the forward is the full-precision one, bit for bit; the backward is exactly the
vector-Jacobian product of the block run under autocast (the same operations as a plain
autocast forward and backward with the CPU's attention in float32, so the same bits); the
parameters' gradients arrive through the reentrant backward, with their hooks; a block whose
gradient does not flow in through its hidden states alone falls back to the exact checkpoint;
and ``source.stale.grad_dtype`` resolves, is refused where it cannot apply, and is reported.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlens.config import validate
from gradlens.errors import GradlensError
from gradlens.sources import staleness as staleness_module
from gradlens.sources.autocast_recompute import autocast_recomputed, lowerable
from gradlens.sources.float32_attention import attention_in_float32
from gradlens.sources.forward import checkpointed_blocks
from gradlens.sources.staleness import stale_grad_dtype

transformers = pytest.importorskip("transformers")

from tiny_checkpoints import save_checkpoint  # noqa: E402

CPU = torch.device("cpu")


def llama_layer() -> tuple[nn.Module, dict]:
    """One Llama decoder layer and the keyword arguments its model hands it."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=50,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    positions = torch.arange(12)[None].expand(3, -1)
    cos_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(3, 12, 64), positions)
    mask = torch.ones(3, 1, 12, 12, dtype=torch.bool).tril()
    return layer, {"attention_mask": mask, "position_embeddings": cos_sin}


def grads_of(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = [x.grad]
    out += [p.grad for p in layer.parameters()]
    assert all(g is not None for g in out)
    return [g.clone() for g in out]  # type: ignore[union-attr]


def test_the_forward_is_exact_and_the_backward_is_the_autocast_blocks_vjp():
    layer, kwargs = llama_layer()
    x0 = torch.randn(3, 12, 64)
    cotangent = torch.randn(3, 12, 64)

    x = x0.clone().requires_grad_(True)
    y = autocast_recomputed(layer.forward, (x,), kwargs, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(y, layer(x0, **kwargs))  # the forward in float32, bit for bit
    y.backward(cotangent)
    ours = grads_of(layer, x)

    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), attention_in_float32(CPU):
        y_low = layer(x, **kwargs)
    y_low.backward(cotangent)
    assert all(torch.equal(a, b) for a, b in zip(ours, grads_of(layer, x), strict=True))

    # and it is a lower-precision gradient, not the float32 one
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    layer(x, **kwargs).backward(cotangent)
    exact = grads_of(layer, x)
    assert any(not torch.equal(a, b) for a, b in zip(ours, exact, strict=True))
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-8): a gradient here is the product
    # chain of at most four of the block's products (down/o-projection, the MLP's or the
    # attention's inner product, the input projection) with both operands of each rounded
    # once, ≤ 8u norm-wise (0.3–1.8u measured); float32's would be ~1e-7
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, exact, strict=True))
    assert 1e-5 < rel <= 8 * 2**-8


def test_hidden_states_as_a_keyword_and_tuple_outputs():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, hidden_states, scale=1.0):
            return hidden_states + scale * self.lin(hidden_states), "extra", None

    block = Block()
    x0 = torch.randn(5, 8)
    x = x0.clone().requires_grad_(True)
    y, extra, none = autocast_recomputed(
        block.forward, (), {"hidden_states": x, "scale": 2.0}, torch.bfloat16
    )
    assert (extra, none) == ("extra", None)
    y.sum().backward()
    ours = grads_of(block, x)
    block.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_low = block(x, scale=2.0)[0]
    y_low.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(ours, grads_of(block, x), strict=True))


def test_gradient_through_another_argument_falls_back_to_the_exact_checkpoint():
    x = torch.randn(2, 3, requires_grad=True)
    assert lowerable((x, torch.ones(2), (torch.zeros(1), None), 3), {})
    assert lowerable((), {"hidden_states": x, "attention_mask": torch.ones(2)})
    grad_pair = (torch.zeros(1, requires_grad=True), None)
    assert not lowerable((x,), {"position_embeddings": grad_pair})
    assert not lowerable((x, grad_pair), {})
    assert not lowerable((x.detach(),), {})

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = transformers.PretrainedConfig(num_hidden_layers=1)
            self.layers = nn.ModuleList([nn.Linear(3, 3)])

        def forward(self, x, bias):
            return self.layers[0](x) * bias

    class Block(nn.Linear):
        def forward(self, x, bias=None):  # type: ignore[override]
            return super().forward(x) * bias

    model = Model()
    model.layers[0] = Block(3, 3)
    x0 = torch.randn(4, 3)
    grads = []
    for lowered in (torch.bfloat16, None):
        bias = torch.full((3,), 1.5, requires_grad=True)
        x = x0.clone().requires_grad_(True)
        with checkpointed_blocks(model, lowered):
            model.layers[0](x, bias=bias).sum().backward()
        grads.append([x.grad, bias.grad, model.layers[0].weight.grad])
        model.zero_grad(set_to_none=True)
    # the bias's gradient is kept, and both runs took the exact path: equal bit for bit
    assert grads[0][1] is not None
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


def test_parameter_hooks_run_inside_the_reentrant_backward():
    layer, kwargs = llama_layer()
    seen: list[int] = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: seen.append(id(p)))
        for p in layer.parameters()
    ]
    x = torch.randn(3, 12, 64, requires_grad=True)
    autocast_recomputed(layer.forward, (x,), kwargs, torch.bfloat16).sum().backward()
    for h in handles:
        h.remove()
    assert sorted(seen) == sorted(id(p) for p in layer.parameters())


@pytest.mark.parametrize(
    "name, dtype, native, expected",
    [
        ("auto", torch.float32, True, torch.bfloat16),
        ("auto", torch.float32, False, None),
        ("auto", torch.float64, True, None),
        ("auto", torch.bfloat16, True, None),
        ("bfloat16", torch.float32, False, torch.bfloat16),  # asked for: emulated if need be
        ("bfloat16", torch.bfloat16, True, None),  # nothing lower to go to
        ("model", torch.float32, True, None),
    ],
)
def test_grad_dtype_resolution(monkeypatch, name, dtype, native, expected):
    monkeypatch.setattr(staleness_module, "native_bf16", lambda device: native)
    assert stale_grad_dtype(name, dtype, CPU) is expected


def test_bfloat16_grads_are_refused_for_a_float64_run():
    cfg = {"dtype": "float64", "source": {"kind": "model", "stale": {"grad_dtype": "bfloat16"}}}
    with pytest.raises(GradlensError, match=r"source.stale.grad_dtype 'bfloat16'.*float64"):
        validate(cfg)
    validate({**cfg, "dtype": "float32"})  # float32 is what autocast lowers


@pytest.mark.slow
def test_stale_steps_with_a_bf16_backward_keep_the_forwards_exact(tmp_path):
    """Two runs that differ only in grad_dtype: π_old, from the forward at θ_0, is the same
    bits; the steps still reach the target KL; the report says how the blocks were
    recomputed."""
    from gradlens.compare import run_compare
    from gradlens.report.model_table import pass_text

    path = save_checkpoint(tmp_path / "llama", "llama")
    reports = {}
    for grad_dtype in ("bfloat16", "model"):
        cfg = {
            "losses": ["ppo_clip"],
            "source": {
                "kind": "model", "path": str(path), "prompts": ["def add(a, b):\n", "import os\n"],
                "group_size": 4, "max_new_tokens": 8, "reward": "length",
                "rollout_dtype": "float32", "stale": {"grad_dtype": grad_dtype},
            },
        }  # fmt: skip
        reports[grad_dtype] = run_compare(validate(cfg))
    low, exact = reports["bfloat16"].model, reports["model"].model
    assert low is not None and exact is not None
    assert low.mismatch.kl_k3 == exact.mismatch.kl_k3  # μ vs π_old: both passes identical
    passes = [low.staleness.model_pass, exact.staleness.model_pass]
    assert [p.recompute_dtype for p in passes] == ["bfloat16", None]
    assert "recomputed in the backward in bfloat16 (autocast)" in pass_text(passes[0])
    assert low.gradient_pass.recompute_dtype is None  # the diagnosis stays exact
    target = low.staleness.target_kl
    for model in (low, exact):
        kl = model.staleness.trajectory[-1].kl_k3
        assert target / 1.5 <= kl <= target * 1.5
    assert low.staleness.trajectory[-1].kl_k3 != exact.staleness.trajectory[-1].kl_k3
