"""Staleness: N optimizer steps on the rollout batch, so that π_θ ≠ π_old for real.

In PPO-style training the policy takes several optimizer steps (mini-batches, epochs) on one
rollout batch; from the second step on, the parameters θ that compute π_θ have moved away from
the θ_old that computed π_old, and the ratio r = π_θ/π_old leaves 1. Here:

    θ_0 = θ_old;  for k = 0 … N−1:  θ_{k+1} = optimizer step on L_stale(θ_k)

with the optimizer (sgd, adam, adamw), learning rate and loss of ``source.stale``; the loss is
any registered loss, aggregated as in the run (``loss.aggregation``), and written once in
`gradlens.grads.objective`. π_old is the training pass at θ_0 (so at N = 0 the ratio is exactly
1); the log-probs at every θ_k, k = 0 … N, are recorded (`StalenessRecord`), and the report
turns them into ratio statistics and clip fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradlens.config import StaleConfig
from gradlens.containers import Batch, Sequences, StalenessRecord, StalePoint
from gradlens.grads import PolicyPass, objective, on_grid, policy_entropy, policy_pass
from gradlens.logits import kept_entries
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.progress import report
from gradlens.sources.forward import final_hidden, head_weight

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class StaleResult:
    record: StalenessRecord
    old_logp: Tensor  # [N, T] log π_old(y_t): the training pass at θ_0
    hidden: Tensor  # [N, T, H] h_t/T at θ_N (detached), for the batch
    old_kept_log_mass: Tensor | None = None  # [N, T] log S^old_t of the kept sets, if given


def stale_steps(
    model: nn.Module,
    seqs: Sequences,
    advantages: Tensor,
    rollout_logp: Tensor,
    cfg: StaleConfig,
    temperature: float,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    bias: bool,
    kept_ids: Tensor | None = None,
    groups: Tensor | None = None,
) -> StaleResult:
    """Take the N steps in place on ``model``: the trajectory, π_old, and h at θ_N; with the
    rollout's kept sets ``kept_ids`` [N, T, K] also π_old's kept mass log S^old_t.

    ``groups`` [N]: the sequences' prompt groups (`Batch.groups`, for group-coupled losses)."""
    mask, tokens = seqs.loss_mask, seqs.tokens
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr)
    trajectory: list[StalePoint] = []
    old_logp: Tensor | None = None
    old_mass: Tensor | None = None
    for k in range(cfg.steps + 1):
        report("stale steps", k, cfg.steps)
        last = k == cfg.steps
        with torch.set_grad_enabled(not last):
            hidden = final_hidden(model, seqs, temperature, bias)
            weight = head_weight(model)
            policy = policy_pass(hidden, weight, tokens, mask)
        if old_logp is None:
            old_logp = policy.logp.detach()  # π_old: the training pass at θ_old
            if kept_ids is not None:
                old_mass = kept_log_mass(policy, kept_ids)
        loss_value = None
        if not last:
            batch = Batch(
                hidden=hidden.detach(),
                weight=weight.detach(),
                tokens=tokens,
                mask=mask,
                old_logp=old_logp,
                advantages=advantages,
                rollout_logp=rollout_logp.to(old_logp.dtype),
                groups=groups,
            )
            entropy = policy_entropy(policy, [spec], params)
            loss = objective(batch, policy.logp, spec, params, aggregation, entropy).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
        trajectory.append(StalePoint(k, loss_value, policy.logp.detach()))
    optimizer.zero_grad(set_to_none=True)
    assert old_logp is not None
    record = StalenessRecord(cfg.steps, cfg.optimizer, cfg.lr, cfg.loss, trajectory)
    return StaleResult(record, old_logp, hidden.detach(), old_mass)


def kept_log_mass(policy: PolicyPass, kept_ids: Tensor) -> Tensor:
    """[N, T] log S_t = log Σ_{v∈K_t} π_t,v of the pass's (full) distribution, 0 off the mask."""
    with torch.no_grad():
        keep = kept_entries(kept_ids[policy.rows, policy.cols], 0, policy.log_probs.shape[-1])
        mass = torch.logsumexp(policy.log_probs.detach().masked_fill(~keep, -torch.inf), dim=-1)
    return on_grid(mass, policy.rows, policy.cols, policy.logp.shape)
