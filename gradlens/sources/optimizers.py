"""The optimizers of the stale steps, written out: SGD, Adam and AdamW as torch.optim has them.

Per parameter, elementwise, with torch.optim's defaults (the tests check each one against
torch.optim in float64), for the k-th update of that parameter:

    sgd     θ ← θ − lr·g
    adam    m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
            θ ← θ − (lr/(1 − β1^k))·m / (√v/√(1 − β2^k) + ε)      β = (0.9, 0.999), ε = 1e-8
    adamw   θ ← θ·(1 − lr·λ), then adam's update                   λ = 0.01

Written out rather than taken from torch.optim for two reasons:

- A parameter can be updated as soon as its gradient is complete (`StaleOptimizer.in_backward`:
  a hook after the gradient is accumulated, which then frees it), so the whole gradient never
  exists at once: with Adam's two state tensors, that is the size of the weights saved once
  more at the peak.
- The last update can be redone with another learning rate (`StaleOptimizer.rescale`). Each
  update is θ_k = θ_{k−1}·(1 − lr·λ) + lr·u_k with a direction u_k that the state gives back:
  u_k = −m̂/(√v̂ + ε) for Adam (m̂, v̂ the bias-corrected moments), u_k = −g for SGD (the last
  gradient is kept), λ = 0 except for AdamW. So θ_{k−1} = (θ_k − lr·u_k)/(1 − lr·λ), and θ_k
  with lr' is θ_{k−1}·(1 − lr'·λ) + lr'·u_k, without a copy of θ_{k−1}. The stale steps use it
  to reach a target KL (`gradlens.sources.staleness`).

What Adam keeps between updates, told how many updates it will take (``updates`` = N): the
moments m, v (two tensors the size of the weights) only where a later update reads them. After
the first update they are m_1 = (1 − β1)·g_1 and v_1 = (1 − β2)·g_1², so g_1 alone is kept and
both are rebuilt from it by the same operations (the same bits) when the second update or a
redo needs them; after the N-th update only its direction u_N is kept, which is all a redo
reads. So N ≤ 2 steps hold one tensor the size of the weights between updates, not two.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

BETAS = (0.9, 0.999)  # torch.optim.Adam / AdamW defaults
EPS = 1e-8
ADAMW_DECAY = 0.01  # torch.optim.AdamW's default weight decay λ
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
PIECE = 1 << 20  # elements of a weight updated at a time (4 MiB in float32)


class Scratch(NamedTuple):
    """Working pieces of `PIECE` elements, reused by every piece of every update."""

    first: Tensor  # m rebuilt from g
    second: Tensor  # v rebuilt from g
    denominator: Tensor
    direction: Tensor


class StaleOptimizer:
    """``kind`` (sgd, adam or adamw) over ``params`` at learning rate ``lr``."""

    def __init__(
        self, params: list[nn.Parameter], kind: str, lr: float, updates: int | None = None
    ) -> None:
        if kind not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.params = params
        self.kind = kind
        self.lr = lr  # the learning rate of the next update, and of the last one taken
        self.decay = ADAMW_DECAY if kind == "adamw" else 0.0
        self.state: dict[int, dict[str, Tensor]] = {}
        self.count: dict[int, int] = {}  # updates each parameter has had (Adam's k)
        self.last: set[int] = set()  # the parameters the last step updated
        self.updates = updates  # how many updates each parameter will have (None: unknown)
        self.work: dict[tuple[torch.dtype, torch.device], Scratch] = {}

    @torch.no_grad()
    def update(self, p: nn.Parameter) -> None:
        """One update of ``p`` with its gradient, which is then freed."""
        g = p.grad
        if g is None:
            return
        p.grad = None
        key = id(p)
        self.last.add(key)
        k = self.count.get(key, 0) + 1
        self.count[key] = k
        if self.kind == "sgd":
            self.state[key] = {"g": g}
            p.add_(g, alpha=-self.lr)
            return
        old = self.state.get(key, {})
        if "u" in old:
            raise RuntimeError("the optimizer was told its last update has been taken")
        # Each piece of the old state is read before the same piece of the new one is written,
        # so the new state takes over a buffer of the old (g_1's, or m's) where there is one.
        spare = old.get("g", old.get("m"))
        if k == self.updates:  # the last update: only a redo reads its state
            new = {"u": torch.empty_like(p) if spare is None else spare}
        elif k == 1:
            new = {"g": g}  # m_1 and v_1 are rebuilt from g_1
        elif "m" in old:
            new = old  # advanced in place, piece by piece
        else:
            new = {"m": torch.empty_like(p) if spare is None else spare, "v": torch.empty_like(p)}
        step = -self.lr / (1 - BETAS[0] ** k)
        work = self._scratch(p)
        for i, (pp, gp) in pieces(p, g):
            m, v = _moments(old, i, gp, work)
            denominator = _denominator(v, k, work.denominator[: v.numel()])
            if self.decay:
                pp.mul_(1 - self.lr * self.decay)
            pp.addcdiv_(m, denominator, value=step)
            if "u" in new:
                _adam_direction(m, denominator, k, new["u"].view(-1)[i])
            elif "m" in new and new is not old:
                new["m"].view(-1)[i] = m
                new["v"].view(-1)[i] = v
        self.state[key] = new

    def _direction(self, key: int, i: slice, work: Scratch) -> Tensor:
        """The piece ``i`` of u of the last update (see the module docstring)."""
        state = self.state[key]
        if self.kind == "sgd":
            return torch.neg(state["g"].view(-1)[i], out=work.direction[: i.stop - i.start])
        if "u" in state:
            return state["u"].view(-1)[i]
        k = self.count[key]
        m, v = _moments(state, i, None, work)
        denominator = _denominator(v, k, work.denominator[: v.numel()])
        return _adam_direction(m, denominator, k, work.direction[: v.numel()])

    def _scratch(self, p: Tensor) -> Scratch:
        """Working pieces for ``p``'s dtype and device, made once: a piece's temporaries
        written into memory that is reused, not allocated anew (the allocator hands 4 MiB back
        to the system and takes it again with a page fault per 4 KiB, which made an Adam
        update of a 135M-parameter model 1.8 s instead of 0.2 s)."""
        where = (p.dtype, p.device)
        if where not in self.work:
            size = min(PIECE, max((q.numel() for q in self.params), default=1))
            self.work[where] = Scratch(
                *(torch.empty(size, dtype=p.dtype, device=p.device) for _ in range(4))
            )
        return self.work[where]

    def step(self) -> None:
        """Update every parameter that has a gradient (after micro-batches accumulated it)."""
        self.last = set()
        for p in self.params:
            self.update(p)

    @contextmanager
    def in_backward(self) -> Iterator[None]:
        """Inside the block, a backward updates each parameter once its gradient is complete."""
        self.last = set()
        handles = [p.register_post_accumulate_grad_hook(self.update) for p in self.params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def rescale(self, lr: float) -> None:
        """Redo the last update of every parameter with learning rate ``lr``."""
        old = self.lr
        for p in self.params:
            key = id(p)
            if key not in self.last:
                continue
            work = self._scratch(p)
            for i, (pp,) in pieces(p):
                u = self._direction(key, i, work)
                if self.decay:
                    pp.sub_(u, alpha=old).div_(1 - old * self.decay).mul_(1 - lr * self.decay)
                    pp.add_(u, alpha=lr)
                else:
                    pp.add_(u, alpha=lr - old)
        self.lr = lr


def pieces(*tensors: Tensor) -> Iterator[tuple[slice, tuple[Tensor, ...]]]:
    """(slice, views) of contiguous tensors of one shape, `PIECE` elements at a time: every
    update is elementwise, so it runs piece by piece with the same result, and its temporaries
    are pieces, not tensors the size of the largest weight (the embedding)."""
    flat = [t.view(-1) for t in tensors]
    total = flat[0].numel()
    for start in range(0, total, PIECE):
        i = slice(start, min(start + PIECE, total))
        yield i, tuple(f[i] for f in flat)


def _moments(
    state: dict[str, Tensor], i: slice, g: Tensor | None, work: Scratch
) -> tuple[Tensor, Tensor]:
    """The piece ``i`` of (m, v) after the last update, advanced by ``g`` (that piece of a new
    gradient) when given. Kept moments are advanced in place; (m_1, v_1) are rebuilt from g_1
    by the operations the first update used, into ``work``'s pieces; none kept: the first
    update's, from zero."""
    if "m" in state:
        m, v = state["m"].view(-1)[i], state["v"].view(-1)[i]
    elif "g" in state:
        m, v = _from_zero(state["g"].view(-1)[i], work)
    else:
        assert g is not None, "no update has been taken"
        return _from_zero(g, work)
    if g is not None:
        m.lerp_(g, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    return m, v


def _from_zero(g: Tensor, work: Scratch) -> tuple[Tensor, Tensor]:
    """(m_1, v_1): Adam's first moments, from m = v = 0, into ``work``'s pieces. In float32 and
    float64, which ``lerp_`` and ``addcmul_`` compute in, they are ((1 − β1)·g, ((1 − β2)·g)·g)
    with the same roundings (0 + w·(g − 0), 0 + (w·g)·g), formed without writing the zeros
    first; a narrower dtype is computed in float32 by those two and rounded once, so it takes
    them as they are."""
    n = g.numel()
    m, v = work.first[:n], work.second[:n]
    if g.dtype in (torch.float32, torch.float64):
        torch.mul(g, 1 - BETAS[0], out=m)
        torch.mul(g, 1 - BETAS[1], out=v).mul_(g)
        return m, v
    m.zero_().lerp_(g, 1 - BETAS[0])
    v.zero_().mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    return m, v


def _denominator(v: Tensor, k: int, out: Tensor) -> Tensor:
    """√v/√(1 − β2^k) + ε, written into ``out``."""
    return torch.sqrt(v, out=out).div_(math.sqrt(1 - BETAS[1] ** k)).add_(EPS)


def _adam_direction(m: Tensor, denominator: Tensor, k: int, out: Tensor) -> Tensor:
    """−m̂/(√v̂ + ε), written into ``out``."""
    return torch.div(m, denominator, out=out).mul_(-1 / (1 - BETAS[0] ** k))
