"""Every valid token in full: π_θ(y), π_old(y), r, A, a_t, c_t and ∂L/∂z_t.

Meant for hand-computed cases and small batches; for a literal config these are the numbers
to compare with the arithmetic of losses.md §12.
"""

from __future__ import annotations

import torch

from gradlens.containers import Batch
from gradlens.diagnostics.numbers import num
from gradlens.grads import LossGradients, SoftmaxView, effective_old_logp
from gradlens.results import TokenDetail


def token_details(batch: Batch, view: SoftmaxView, grads: LossGradients) -> list[TokenDetail]:
    """One `TokenDetail` per valid token, in row-major order."""
    rows, cols = view.rows.tolist(), view.cols.tolist()
    logp = view.logp[view.rows, view.cols].double()
    old = effective_old_logp(batch, view.logp)[view.rows, view.cols].double()
    at_y = grads.grad_logits.gather(-1, view.tokens[:, None]).squeeze(-1)
    details = []
    for k, (n, t) in enumerate(zip(rows, cols, strict=True)):
        details.append(
            TokenDetail(
                sequence=n,
                position=t,
                token=int(view.tokens[k]),
                prob=num(logp[k].exp()),
                old_prob=num(old[k].exp()),
                ratio=num(torch.exp(logp[k] - old[k])),
                advantage=float(batch.advantages[n, t]),
                weight=float(grads.weights[n, t]),
                coefficient=num(grads.coefficient[n, t]),
                grad_sampled=num(at_y[k]),
                grad_logits=[num(x) for x in grads.grad_logits[k].tolist()],
            )
        )
    return details
