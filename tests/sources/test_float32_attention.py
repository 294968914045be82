"""Attention in float32 inside a lower-precision recomputation (gradlens.sources.float32_attention).

The claims: under CPU autocast in bf16 the attention is float32 attention of the operands
rounded to bf16, returned in bf16 — its value and its gradient are those of that expression,
bit for bit, and not bf16 attention's; it is nearer the exact attention of the rounded operands
than bf16 attention is; float32 attention outside autocast, integer inputs and calls of other
functions pass through unchanged; keyword operands and a floating additive mask are handled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradlens.sources.float32_attention import attention_dtype, attention_in_float32

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def operands(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k in float32 (as a float32 rotary embedding leaves them), v in bf16, a causal mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 24, 16, generator=g)
    k = torch.randn(2, 4, 24, 16, generator=g)
    v = torch.randn(2, 4, 24, 16, generator=g).to(BF16)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    return q, k, v, mask


def leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_under_autocast_it_is_float32_attention_of_the_bf16_rounded_operands():
    q0, k0, v0, mask = operands()
    cotangent = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(1)).to(BF16)

    q, k, v = leaves(q0, k0, v0)
    with torch.autocast("cpu", dtype=BF16), attention_in_float32(CPU):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == BF16
    out.backward(cotangent)
    ours = [out.detach(), q.grad, k.grad, v.grad]

    q, k, v = leaves(q0, k0, v0)
    ref = F.scaled_dot_product_attention(
        q.to(BF16).float(), k.to(BF16).float(), v.float(), attn_mask=mask
    ).to(BF16)
    ref.backward(cotangent)
    assert all(
        torch.equal(a, b) for a, b in zip(ours, [ref.detach(), q.grad, k.grad, v.grad], strict=True)
    )

    q, k, v = leaves(q0, k0, v0)
    with torch.autocast("cpu", dtype=BF16):
        low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert low.dtype == BF16
    assert not torch.equal(low.detach(), ours[0])  # bf16 attention is another computation

    # nearer the exact (float64) attention of the same rounded operands than bf16 attention
    exact = F.scaled_dot_product_attention(
        q0.to(BF16).double(), k0.to(BF16).double(), v0.double(), attn_mask=mask
    )
    err_ours = float((ours[0].double() - exact).norm())
    err_low = float((low.detach().double() - exact).norm())
    assert err_ours <= err_low


def test_bf16_operands_without_autocast_keywords_and_an_additive_mask():
    q0, k0, v0, mask = operands(2)
    q, k, v = (t.to(BF16) for t in (q0, k0, v0))
    additive = torch.zeros(24, 24, dtype=BF16).masked_fill(~mask, -1e4)
    with attention_in_float32(CPU):
        out = F.scaled_dot_product_attention(q, key=k, value=v, attn_mask=additive)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=additive.float()
    )
    assert out.dtype == BF16
    assert torch.equal(out, ref.to(BF16))


def test_what_passes_through_unchanged():
    q, k, _, mask = operands(3)
    v = k.clone()
    with attention_in_float32(CPU):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        other = torch.softmax(q, dim=-1)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(other, torch.softmax(q, dim=-1))
    assert attention_dtype([q, k, v]) is None  # float32: nothing to change
    assert attention_dtype([q.double(), k.double(), v.double()]) is None
    assert attention_dtype([q.to(torch.float16), k, v]) == torch.float16
    with torch.autocast("cpu", dtype=BF16):
        assert attention_dtype([q, k, v]) == BF16
        assert attention_dtype([q.double(), k.double(), v.double()]) is None
        with attention_in_float32(CPU):
            wide = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert wide.dtype == torch.float64
        assert torch.equal(wide, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))


def test_on_another_device_the_mode_is_not_entered():
    with attention_in_float32(torch.device("meta")):
        assert not torch.overrides._is_torch_function_mode_enabled()
    with attention_in_float32(CPU):
        assert torch.overrides._is_torch_function_mode_enabled()
