"""The logit product with a bf16 backward: the forward exact, each backward product within the
rounding of its bf16 operands and output.

An entry of a product of operands rounded to bf16 (relative u = 2^-9 each), accumulated in
float32 and rounded to bf16 at the end (u again), is off from the exact product by at most
about (2u + u)·Σ_k |a_ik||b_kj| plus float32's accumulation (K·2^-24 of the same sum, far less):
the bound the test takes is 4u·(|A||B|)_ij.
"""

from __future__ import annotations

import torch

from gradlens.logits import compute_logits
from gradlens.sources.lowered_product import lowered_logits

U = 2.0**-9


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(12, 32, generator=g).requires_grad_(True)
    weight = torch.randn(500, 32, generator=g).requires_grad_(True)
    grad = torch.randn(12, 500, generator=g)
    return hidden, weight, grad


def test_the_forward_is_the_logits_bit_for_bit():
    hidden, weight, _ = case()
    assert torch.equal(
        lowered_logits(torch.bfloat16)(hidden, weight), compute_logits(hidden, weight)
    )
    assert lowered_logits(None) is compute_logits


def test_the_backward_products_carry_bf16_rounding_and_no_more():
    hidden, weight, grad = case(1)
    lowered_logits(torch.bfloat16)(hidden, weight).backward(grad)
    d_hidden, d_weight = hidden.grad, weight.grad
    h, w, g = hidden.detach().double(), weight.detach().double(), grad.double()
    exact_h, exact_w = g @ w, g.T @ h
    bound_h, bound_w = 4 * U * (g.abs() @ w.abs()), 4 * U * (g.abs().T @ h.abs())
    assert bool(((d_hidden.double() - exact_h).abs() <= bound_h).all())
    assert bool(((d_weight.double() - exact_w).abs() <= bound_w).all())
    # and it is lowered: float32 products would be within 2^-20 of the exact ones
    assert float((d_weight.double() - exact_w).abs().max()) > 1e-4 * float(exact_w.abs().max())
    assert d_hidden.dtype == torch.float32 and d_weight.dtype == torch.float32


def test_only_the_inputs_that_need_a_gradient_get_one():
    hidden, weight, grad = case(2)
    frozen = weight.detach()
    lowered_logits(torch.bfloat16)(hidden, frozen).backward(grad)
    assert hidden.grad is not None and frozen.grad is None
