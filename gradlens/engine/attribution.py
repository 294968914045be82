"""Exact attribution of an lm_head gradient to its tokens and sequences, one vocabulary chunk at a
time: the sums both engines accumulate (docs/attribution.md has the derivations).

For one loss, with g_t = ∂L/∂z_t ∈ R^V, h_t the final hidden state and G = ∂L/∂W = Σ_t g_t h_tᵀ:

    q_t = G h_t ∈ R^V                       (what the lm_head step does to token t's logits)
    s_t = ⟨g_t h_tᵀ, G⟩ = g_tᵀ q_t          (token t's part of ‖G‖²: Σ_t s_t = ‖G‖²_F)

Every loss in gradlens has g_t = c_t·(e_y − π_t) + E_t, with the entropy bonus's block
E_t = w_t·d_t (w_t = a_t·S_t·c_H, 0 without the bonus) and the entropy direction

    d_tv = π_tv·(log π_tv + H_t) = −∂H_t/∂z_tv.

So s_t = c_t·u_t + w_t·e_t with two scalars per token,

    u_t = q_t,y − Σ_v π_tv q_tv,        e_t = Σ_v d_tv q_tv,

and they are sums over the vocabulary: a chunk of rows [start, end) of G (the loss's rows
R = G[start:end], complete within the chunk in both engines) gives Q = R hᵀ [Vc, M], one more
GEMM of 2·M·H·Vc, and adds its part of u and e. e_t is also the first-order entropy change of
one SGD step on the lm_head alone: ΔW = −η G gives Δz_t = −η q_t and ΔH_t = η·e_t + O(η²).

Per-sequence norms ‖G_i‖_F with G_i = Σ_{t∈i} g_t h_tᵀ are sums over the chunks of the squared
norms of G_i's row blocks, ‖G_i[start:end]‖², each computed one of two exact ways per block of
sequences (`SequenceLayout`): *ghost* (Goodfellow's and Opacus's trick) for sequences of at most
H tokens, Σ_{t,s∈i} (g_t·g_s)(h_t·h_s), a [T_i, T_i] Gram of the chunk's g against the Gram
of h computed once, 2·T_i²·Vc multiply-adds; *direct* for longer ones, the [Vc, H] block
g_iᵀ h_i, 2·T_i·H·Vc. Nothing of size N×V×H, or N×T×T beyond a block, is formed.

Per-token sums shared by every loss (they turn c_t, w_t into norms and entropy changes):

    Σ_{v≠y} π_v²,       Σ_{v≠y} π_v d_v,       Σ_v d_v²

(the sampled entry left out, so that (1 − π_y)² + Σ_{v≠y} π_v² = ‖e_y − π‖² and
d_y(1 − π_y) − Σ_{v≠y} π_v d_v = (e_y − π)·d keep their precision as π_y → 1).

All sums are in the dtype of the inputs given (the engine's softmax dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SequenceBlock:
    """Sequences of similar length padded to one [n, T_b] block of token indices.

    Attributes:
        sequences: [n] sequence ids.
        rows, cols: [m_b] each: where each of the block's tokens goes in the padded block.
        tokens: [m_b] the tokens' indices among the M valid tokens.
        width: T_b, the longest sequence of the block.
        ghost: the block's norms by the ghost Gram (T_b ≤ H), else directly.
        hidden: [n, T_b, T_b] h_t·h_s (ghost) or [n, T_b, H] padded h (direct).
    """

    sequences: Tensor
    rows: Tensor
    cols: Tensor
    tokens: Tensor
    width: int
    ghost: bool
    hidden: Tensor

    def padded(self, values: Tensor) -> Tensor:
        """[n, T_b, D] of the block's tokens' rows of ``values`` [M, D], zeros at padding."""
        out = values.new_zeros(self.sequences.numel(), self.width, values.shape[1])
        out[self.rows, self.cols] = values[self.tokens]
        return out

    def multiply_adds(self, hidden_size: int) -> int:
        """Multiply-adds per vocabulary row of the block's norm update."""
        n = self.sequences.numel()
        return n * self.width * (self.width if self.ghost else hidden_size)


@dataclass(frozen=True)
class SequenceLayout:
    """Which sequence each valid token belongs to, cut into `SequenceBlock`s.

    Attributes:
        num_sequences: N (sequences without a valid token have norm 0).
        num_tokens: M.
        hidden_size: H.
        blocks: the blocks, longest sequences first.
    """

    num_sequences: int
    num_tokens: int
    hidden_size: int
    blocks: list[SequenceBlock]

    @property
    def multiply_adds_per_row(self) -> int:
        """Multiply-adds per vocabulary row of one loss's per-sequence norms."""
        return sum(b.multiply_adds(self.hidden_size) for b in self.blocks)


def sequence_layout(sequence: Tensor, num_sequences: int, hidden: Tensor) -> SequenceLayout:
    """Blocks of the M valid tokens whose sequence ids are ``sequence`` [M], from the hidden
    states ``hidden`` [M, H] (in the dtype of the sums).

    Sequences are sorted by length (longest first) and cut into blocks of at most M padded
    tokens, so a block's padded copy of a chunk [n, T_b, Vc] is never larger than the chunk's
    [M, Vc] block; a block is ghost when its longest sequence has at most H tokens, and a
    direct block holds only sequences longer than H.
    """
    m, size = hidden.shape
    device = sequence.device
    lengths = torch.bincount(sequence, minlength=num_sequences)  # [N]
    order = torch.argsort(sequence, stable=True)  # tokens grouped by sequence, in order
    starts = torch.cumsum(lengths, 0) - lengths  # [N] first token of each sequence in `order`
    within = torch.empty_like(sequence)
    within[order] = torch.arange(m, device=device) - starts[sequence[order]]  # index in sequence
    by_length = [int(i) for i in torch.argsort(lengths, descending=True, stable=True)]
    by_length = [i for i in by_length if int(lengths[i]) > 0]
    blocks = []
    k = 0
    while k < len(by_length):
        width = int(lengths[by_length[k]])
        count = max(1, m // width)
        if width > size:  # a direct block holds no sequence that the ghost way does cheaper
            count = min(count, sum(1 for i in by_length[k:] if int(lengths[i]) > size))
        ids = torch.tensor(by_length[k : k + count], device=device)  # [n]
        k += count
        slot = torch.full((num_sequences,), -1, dtype=torch.long, device=device)
        slot[ids] = torch.arange(ids.numel(), device=device)
        tokens = torch.nonzero(slot[sequence] >= 0).squeeze(-1)  # [m_b]
        rows, cols = slot[sequence[tokens]], within[tokens]
        ghost = width <= size
        padded = hidden.new_zeros(ids.numel(), width, size)
        padded[rows, cols] = hidden[tokens]  # [n, T_b, H]
        block_hidden = padded @ padded.transpose(1, 2) if ghost else padded
        blocks.append(SequenceBlock(ids, rows, cols, tokens, width, ghost, block_hidden))
    return SequenceLayout(num_sequences, m, size, blocks)


def entropy_direction(log_probs: Tensor, probs: Tensor, entropy: Tensor) -> Tensor:
    """d = π·(log π + H) [M, Vc], written over ``log_probs`` (which it consumes)."""
    return log_probs.add_(entropy[:, None]).mul_(probs)


def logit_grad_block(
    probs: Tensor,
    coefficient: Tensor,
    inside: Tensor,
    local: Tensor,
    bonus: Tensor | None = None,
) -> Tensor:
    """A chunk of ∂L/∂z: c_t·(e_y − π_t) (+ the bonus block E), [M, Vc].

    ``inside`` [m'] the tokens whose sampled id lies in the chunk, ``local`` [m'] its column.
    """
    g = probs * (-coefficient[:, None])
    g[inside, local] += coefficient[inside]
    if bonus is not None:
        g += bonus
    return g


@dataclass
class TokenSums:
    """Per-token sums over the vocabulary shared by every loss, [M] each (see the docstring)."""

    other_sq: Tensor  # Σ_{v≠y} π_v²
    other_pd: Tensor  # Σ_{v≠y} π_v d_v
    dd: Tensor  # Σ_v d_v²

    @classmethod
    def zeros(cls, m: int, dtype: torch.dtype, device: torch.device) -> TokenSums:
        return cls(*(torch.zeros(m, dtype=dtype, device=device) for _ in range(3)))

    def add(self, probs: Tensor, d: Tensor, inside: Tensor, local: Tensor) -> None:
        """Add one chunk: π [M, Vc] and d [M, Vc]."""
        sq = probs * probs
        sq[inside, local] = 0.0
        self.other_sq += sq.sum(-1)
        torch.mul(probs, d, out=sq)
        sq[inside, local] = 0.0
        self.other_pd += sq.sum(-1)
        self.dd += torch.mul(d, d, out=sq).sum(-1)


@dataclass
class LossSums:
    """One loss's attribution sums: u [M], e [M] and ‖G_i‖² per sequence [N]."""

    u: Tensor
    e: Tensor
    sequence_sq: Tensor

    @classmethod
    def zeros(cls, m: int, n: int, dtype: torch.dtype, device: torch.device) -> LossSums:
        return cls(
            torch.zeros(m, dtype=dtype, device=device),
            torch.zeros(m, dtype=dtype, device=device),
            torch.zeros(n, dtype=dtype, device=device),
        )

    def add(
        self,
        rows: Tensor,
        hidden: Tensor,
        probs: Tensor,
        d: Tensor,
        grad: Tensor,
        inside: Tensor,
        local: Tensor,
        layout: SequenceLayout,
    ) -> None:
        """Add one chunk: the loss's rows R = G[start:end] [Vc, H], h [M, H], π and d [M, Vc],
        its logit-gradient block ``grad`` [M, Vc] (`logit_grad_block`); ``inside``, ``local``
        as there."""
        q = hidden @ rows.T  # [M, Vc]: q_t = G h_t on the chunk's rows
        self.u -= (probs * q).sum(-1)
        self.u[inside] += q[inside, local]
        self.e += q.mul_(d).sum(-1)
        del q
        for block in layout.blocks:
            g = block.padded(grad)  # [n, T_b, Vc]
            if block.ghost:
                gram = g @ g.transpose(1, 2)  # [n, T_b, T_b] g_t·g_s on the chunk
                part = (gram * block.hidden).sum((1, 2))
            else:
                part = (g.transpose(1, 2) @ block.hidden).square().sum((1, 2))  # ‖G_i rows‖²
            self.sequence_sq.index_add_(0, block.sequences, part)


@dataclass(frozen=True)
class AttributionPlan:
    """What the engine attributes: the first ``losses`` losses, over ``layout``'s sequences."""

    losses: int
    layout: SequenceLayout

    def gemm_equivalents(self, rows: int, tokens: int, hidden: int, vocab: int) -> float:
        """One loss's work on ``rows`` vocabulary rows in units of 2·M·H·V: Q = R hᵀ and the
        per-sequence norms."""
        unit = max(tokens * hidden * vocab, 1)
        return rows * (tokens * hidden + self.layout.multiply_adds_per_row) / unit


@dataclass(frozen=True)
class AttributionSums:
    """What an engine run hands back: the shared per-token sums, one `LossSums` per attributed
    loss, and the entropy H_t [M] that d was formed with."""

    tokens: TokenSums
    losses: list[LossSums]
    entropy: Tensor
