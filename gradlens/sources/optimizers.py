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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

BETAS = (0.9, 0.999)  # torch.optim.Adam / AdamW defaults
EPS = 1e-8
ADAMW_DECAY = 0.01  # torch.optim.AdamW's default weight decay λ
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")


class StaleOptimizer:
    """``kind`` (sgd, adam or adamw) over ``params`` at learning rate ``lr``."""

    def __init__(self, params: list[nn.Parameter], kind: str, lr: float) -> None:
        if kind not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.params = params
        self.kind = kind
        self.lr = lr  # the learning rate of the next update, and of the last one taken
        self.decay = ADAMW_DECAY if kind == "adamw" else 0.0
        self.state: dict[int, dict[str, Tensor]] = {}
        self.count: dict[int, int] = {}  # updates each parameter has had (Adam's k)
        self.last: set[int] = set()  # the parameters the last step updated

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
        if self.decay:
            p.mul_(1 - self.lr * self.decay)
        state = self.state.setdefault(key, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        state["m"].lerp_(g, 1 - BETAS[0])
        state["v"].mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        p.addcdiv_(state["m"], self._denominator(key), value=-self.lr / (1 - BETAS[0] ** k))

    def _denominator(self, key: int) -> Tensor:
        """√v/√(1 − β2^k) + ε."""
        k = self.count[key]
        return (self.state[key]["v"].sqrt() / math.sqrt(1 - BETAS[1] ** k)).add_(EPS)

    def _direction(self, key: int) -> Tensor:
        """u of the last update (see the module docstring)."""
        if self.kind == "sgd":
            return -self.state[key]["g"]
        k = self.count[key]
        return self.state[key]["m"] / self._denominator(key) * (-1 / (1 - BETAS[0] ** k))

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
            u = self._direction(key)
            if self.decay:
                p.sub_(u, alpha=old).div_(1 - old * self.decay).mul_(1 - lr * self.decay)
                p.add_(u, alpha=lr)
            else:
                p.add_(u, alpha=lr - old)
        self.lr = lr
