"""The logit path's share of a whole-model backward when the losses read the logits only via ℓ_t.

A loss that touches the logits of token t only through ℓ_t = log π(y_t) has (`gradlens.grads`)

    ∂L_k/∂z_t = c_{k,t}·a_t,     a_t = e_{y_t} − π_t,     c_{k,t} = ∂L_k/∂ℓ_t,

so for K such losses of one forward, with h_t [H'] the final hidden state the lm_head W' [V, H']
reads (H' = H, or H + 1 with a bias column) and A = [a_t] [M, V]:

    ∂L_k/∂h_t = c_{k,t}·d_t,     d_t = W'ᵀ a_t = W'_{y_t} − W'ᵀ π_t      (one product for all K)
    ∂L_k/∂W'  = Σ_t c_{k,t} a_t h_tᵀ = Aᵀ diag(c_k) H.

Through autograd each loss forms its own [M, V] cotangent at the logits and two products with
it (∂L/∂h and ∂L/∂W', 2·M·V·H' multiply-adds each), K times over. Here (`logp_tail`) the c_k
come from autograd of `gradlens.grads.objective` on the [N, T] log-probs alone, d is one
product, and of ∂L_k/∂W' only what the report keeps is formed (`HeadGradient`): its squared
norm, from Gram matrices over the tokens,

    ‖∂L_k/∂W'‖² = Σ_{s,t} c_{k,s} c_{k,t} (AAᵀ)_{st} (HHᵀ)_{st},
    (AAᵀ)_{st}  = [y_s = y_t] − π_s(y_t) − π_t(y_s) + ⟨π_s, π_t⟩,

whose one large product, ⟨π_s, π_t⟩ over the vocabulary (2·M²·V), serves every loss; and,
with tied embeddings, its rows R of the batch's input ids (`gradlens.compare.gradient_norms`):
(∂L_k/∂W')_R = (A_{:,R})ᵀ diag(c_k) H, [|R|, H]. The Gram matrices are summed in float64: the
quadratic form adds M² terms of either sign, and where the tokens' gradients cancel
(‖∂L/∂W'‖² far below Σ_t c_t²‖a_t‖²‖h_t‖²) a float32 Gram would lose to it digits that the
float64 one keeps (the float32 operands' products are exact in float64).

Autograd's cost, 4·K·M·V·H', against 2·M·V·H' + 2·M²·V in float64 (about twice float32's time
on the CPUs measured, `docs/performance.md`): the tail is taken where it is cheaper,
2·M ≤ (2K − 1)·H' (`cheaper`): for 384 tokens, 4 losses and H = 576, 768 ≤ 4,032 — and where
its [M, M] matrices fit in what one [M, V] logit tensor takes, 8·M ≤ V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.grads import PolicyPass

# entries of π widened to float64 at a time for ⟨π_s, π_t⟩ (8 MiB): [M, 2^20 / M] column blocks
GRAM_ENTRIES = 1 << 20


def cheaper(tokens: int, losses: int, width: int, vocab: int) -> bool:
    """Whether the tail costs fewer multiply-adds than autograd's K backward passes through
    the logits (module docstring), for ``tokens`` M, ``losses`` K, W' of ``width`` H' and
    ``vocab`` V — and its [M, M] float64 matrices (four at once) take no more memory than one
    [M, V] float32 logit tensor, which the memory plan budgets for: 8·M ≤ V."""
    return 2 * tokens <= (2 * losses - 1) * width and 8 * tokens <= vocab


@dataclass(frozen=True)
class HeadGradient:
    """What the report keeps of one loss's ∂L/∂W' (module docstring).

    Attributes:
        weight_sq: ‖∂L/∂W'_{:, :H}‖², float64.
        bias_sq: ‖∂L/∂W'_{:, H:}‖² (a bias column's; 0 without one).
        rows: [|R|, H] float64 (∂L/∂W')_{R, :H}, the rows of the input ids R; None when not
            asked for.
    """

    weight_sq: float
    bias_sq: float
    rows: Tensor | None


def probability_gram(probs: Tensor) -> Tensor:
    """[M, V] π → [M, M] float64 ⟨π_s, π_t⟩, summed over vocabulary blocks of `GRAM_ENTRIES`."""
    m = probs.shape[0]
    gram = torch.zeros(m, m, dtype=torch.float64, device=probs.device)
    for block in probs.split(max(1, GRAM_ENTRIES // max(m, 1)), dim=1):
        wide = block.double()
        gram.addmm_(wide, wide.T)
    return gram


def score_gram(probs: Tensor, tokens: Tensor) -> Tensor:
    """[M, M] float64 AAᵀ for a_t = e_{y_t} − π_t (module docstring)."""
    at_tokens = probs.index_select(1, tokens).double()  # [s, t]: π_s(y_t)
    same = (tokens[:, None] == tokens[None, :]).double()
    return same - at_tokens - at_tokens.T + probability_gram(probs)


def head_gradients(
    probs: Tensor,
    tokens: Tensor,
    hidden: Tensor,
    coefficients: list[Tensor],
    hidden_size: int,
    rows: Tensor | None,
) -> list[HeadGradient]:
    """Each loss's `HeadGradient` from π [M, V], y [M], h [M, H'] and its c_k [M].

    ``hidden_size``: H, the weight's columns of W' (the rest, a bias column); ``rows``: R, the
    sorted input ids whose rows are wanted (tied embeddings), or None."""
    scores = score_gram(probs, tokens)  # [M, M]
    wide = hidden.double()
    weight_part = scores * (wide[:, :hidden_size] @ wide[:, :hidden_size].T)
    bias_part = scores * (wide[:, hidden_size:] @ wide[:, hidden_size:].T)
    if rows is not None:
        at_rows = probs.index_select(1, rows).double()  # [M, |R|]: π_t(r)
        place = torch.searchsorted(rows, tokens).clamp(max=len(rows) - 1)
        in_rows = rows[place] == tokens  # y_t ∈ R
    out = []
    for c in coefficients:
        c = c.double()
        part = None
        if rows is not None:
            scaled = c[:, None] * wide[:, :hidden_size]  # [M, H]: c_t h_t
            part = -(at_rows.T @ scaled)  # −Σ_t π_t(r) c_t h_t
            part.index_add_(0, place[in_rows], scaled[in_rows])  # + Σ_{t: y_t = r} c_t h_t
        out.append(HeadGradient(float(c @ weight_part @ c), float(c @ bias_part @ c), part))
    return out


@dataclass(frozen=True)
class LogpTail:
    """The logit path of one forward for K losses that read the logits only through ℓ_t.

    Attributes:
        hidden_cotangents: [N, T, H'] ∂L_k/∂h per loss, on the grid of the hidden states.
        heads: each loss's `HeadGradient`.
    """

    hidden_cotangents: list[Tensor]
    heads: list[HeadGradient]


def logp_tail(
    policy: PolicyPass,
    weight: Tensor,
    coefficients: list[Tensor],
    grid: torch.Size,
    hidden_size: int,
    rows: Tensor | None,
) -> LogpTail:
    """The module docstring's ∂L_k/∂h and `HeadGradient` of each loss, from the forward
    ``policy`` (without a graph) through W' ``weight`` [V, H'] and the c_k [M] of its valid
    tokens; ``grid``: the hidden states' [N, T, H'] shape."""
    probs = policy.log_probs.exp()  # [M, V] in the softmax dtype
    w = weight.to(probs.dtype)
    d = w.index_select(0, policy.tokens) - probs @ w  # [M, H']
    dtype = policy.hidden.dtype
    cotangents = []
    for c in coefficients:
        g = torch.zeros(grid, dtype=dtype, device=d.device)
        g[policy.rows, policy.cols] = (c.to(d.dtype)[:, None] * d).to(dtype)
        cotangents.append(g)
    heads = head_gradients(probs, policy.tokens, policy.hidden, coefficients, hidden_size, rows)
    return LogpTail(cotangents, heads)
