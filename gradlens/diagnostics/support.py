"""The rollout's sampling support: how much of π_θ the kept sets K_t hold, and what replay changes.

With top-p / top-k the rollout drew y_t from μ̃_t = μ_t restricted to K_t, renormalised. For a
policy q, S^q_t = Σ_{v∈K_t} q_t,v and log q̃(y) = log q(y) − log S^q_t (≥ log q(y)). Over the
valid tokens:

    |K_t|, S_t = S^θ_t and log S_t       the kept sets and π_θ's mass in them
    policy ratio   r  = π_θ/π_old   against  r̃ = π̃_θ/π̃_old = r·S^old_t/S^θ_t
    sampler ratio  π_θ/μ̃            against  π̃_θ/μ̃    (μ̃ = μ/S^μ, the probability the token
                                     was really drawn with; the PPO ratio of a trainer that takes
                                     the engine's processed log-probs as ℓ_old)

each with its mean and its clip fraction under verl's ``pg_clipfrac`` rule (A>0 ∧ r>1+ε_high or
A<0 ∧ r<1−ε_low). Without replay the sampler ratio is multiplied by S_t on every token, so at
small kept mass most tokens fall below 1 − ε_low. A stored kept mass that the batch lacks
(`KeptSets`) means the stored log-prob is already of the renormalised distribution.

S^θ is computed here from the batch's hidden states and lm_head, chunk by chunk over the
vocabulary (no [M, V] tensor), independently of the engine that ran the losses.

Under tensor parallelism (the batch holds rows [v0, v1) of W) each rank computes, over its own
rows, logsumexp_v z_v, logsumexp_{v∈K_t} z_v (−inf where it holds none of K_t) and z_y (0 where
it does not hold y); one all_gather of these [M, 3] float64 columns gives every rank the same
logsumexps over the ranks (and z_y from its owner, the others' 0 added exactly), so the report
is the one process's on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlens.containers import Batch, KeptSets, valid_index
from gradlens.diagnostics.numbers import num, quantiles
from gradlens.engine.collectives import Collectives
from gradlens.logits import compute_logits, kept_entries, restrict_logits
from gradlens.results import KeptToken, SupportRatio, SupportReport

CHUNK = 4096  # vocabulary rows per chunk
LOWEST = 10  # tokens listed with the smallest S_t


def kept_log_mass(hidden: Tensor, weight: Tensor, kept_ids: Tensor) -> tuple[Tensor, Tensor]:
    """([M] logsumexp_v z_v, [M] log S_t = logsumexp_{K_t} z − logsumexp_v z) for hidden
    states [M, H], W [V, H] and kept ids [M, K]."""
    lse, lse_kept, _ = _row_sums(hidden, weight, kept_ids, None)
    return lse, lse_kept - lse


def sampled_logp(
    hidden: Tensor, weight: Tensor, tokens: Tensor, comm: Collectives | None = None, v0: int = 0
) -> Tensor:
    """[M] float64 log π(y) = z_y − logsumexp_v z_v over the whole lm_head, chunk by chunk;
    with ``comm`` this rank's ``weight`` holds rows [v0, v0 + len(weight)) and one all_gather
    of the ranks' [M, 2] (logsumexp, z_y) combines them (the same result on every rank)."""
    none = torch.full((tokens.numel(), 1), -1, dtype=torch.int64, device=tokens.device)
    lse, _, z_y = _row_sums(hidden, weight, none, tokens - v0)
    if comm is None:
        return z_y - lse
    every = comm.all_gather(torch.stack([lse, z_y], dim=-1), "logp")  # [P, M, 2]
    return every[..., 1].sum(0) - torch.logsumexp(every[..., 0], 0)


def _row_sums(
    hidden: Tensor, weight: Tensor, kept_ids: Tensor, tokens: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Over ``weight``'s rows (row ids, as ``kept_ids`` and ``tokens`` are given): [M] float64
    logsumexp_v z_v, logsumexp_{v∈K_t} z_v (−inf where none of K_t is here) and z_y (0 where
    y is not here; all 0 when ``tokens`` is None)."""
    m, v = hidden.shape[0], weight.shape[0]
    lse = torch.full((m,), -torch.inf, dtype=torch.float64, device=hidden.device)
    lse_kept = lse.clone()
    z_y = torch.zeros(m, dtype=torch.float64, device=hidden.device)
    for start in range(0, v, CHUNK):
        stop = min(start + CHUNK, v)
        z = compute_logits(hidden, weight[start:stop]).double()  # [M, Vc]
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        if tokens is not None:
            inside = (tokens >= start) & (tokens < stop)
            local = (tokens - start).clamp(0, stop - start - 1)[:, None]  # [M, 1]
            z_y = torch.where(inside, z.gather(-1, local).squeeze(-1), z_y)
        kept = restrict_logits(z, kept_entries(kept_ids, start, stop))
        lse_kept = torch.logaddexp(lse_kept, torch.logsumexp(kept, -1))
    return lse, lse_kept, z_y


def _sharded_log_mass(
    hidden: Tensor, weight: Tensor, kept_ids: Tensor, tokens: Tensor, comm: Collectives, v0: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`kept_log_mass` and z_y of W's rows on every rank of ``comm``, this rank holding rows
    [v0, v0 + len(weight)): one all_gather of the ranks' [M, 3] row sums."""
    local_ids = torch.where(kept_ids >= 0, kept_ids - v0, -1)
    parts = torch.stack(_row_sums(hidden, weight, local_ids, tokens - v0), dim=-1)  # [M, 3]
    every = comm.all_gather(parts, "support")  # [P, M, 3]
    lse = torch.logsumexp(every[..., 0], 0)
    lse_kept = torch.logsumexp(every[..., 1], 0)  # −inf parts add nothing
    return lse, lse_kept - lse, every[..., 2].sum(0)  # one rank's z_y, the others' 0


def _clipfrac(log_r: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> float | None:
    """verl pg_clipfrac's rule over [M] log r and A."""
    if log_r.numel() == 0:
        return None
    r = log_r.exp()
    clipped = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))
    return num(clipped.double().mean())


def _ratio(
    name: str,
    full: str,
    kept: str,
    log_r_full: Tensor,
    log_r_kept: Tensor,
    adv: Tensor,
    eps: tuple[float, float],
) -> SupportRatio:
    empty = log_r_full.numel() == 0
    return SupportRatio(
        name=name,
        formula_full=full,
        formula_kept=kept,
        mean_full=None if empty else num(log_r_full.exp().mean()),
        mean_kept=None if empty else num(log_r_kept.exp().mean()),
        clipfrac_full=_clipfrac(log_r_full, adv, *eps),
        clipfrac_kept=_clipfrac(log_r_kept, adv, *eps),
    )


def _mass_at(log_mass: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor:
    """[M] a stored log kept mass at the valid tokens (0: the stored log-prob is already π̃'s)."""
    if log_mass is None:
        return torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
    return log_mass[rows, cols].double()


def support_report(
    batch: Batch,
    kept: KeptSets,
    replayed: bool,
    eps_low: float,
    eps_high: float,
    comm: Collectives | None = None,
) -> SupportReport:
    """The `SupportReport` of ``batch`` (its stored log-probs over the whole vocabulary, not
    replayed) and its kept sets; ℓ_old is ℓ itself at the batch's on-policy positions.
    ``comm``: the tensor-parallel group, ``batch`` holding this rank's rows of W
    (`Batch.weight_rows`); every rank gets the same report."""
    rows, cols = valid_index(batch.mask)
    ids = kept.valid_ids(rows, cols)  # [M, K]
    h = batch.hidden[rows, cols]  # [M, H]
    y = batch.tokens[rows, cols]  # [M]
    if comm is None:
        lse, log_s = kept_log_mass(h, batch.weight, ids)
        z_y = (h.to(batch.weight.dtype) @ batch.weight.T).double()
        z_y = z_y.gather(-1, y[:, None]).squeeze(-1)
    else:
        v0 = 0 if batch.weight_rows is None else batch.weight_rows.start
        lse, log_s, z_y = _sharded_log_mass(h, batch.weight, ids, y, comm, v0)
    logp = z_y - lse  # [M] ℓ = log π_θ(y) (float64 here; the engine's ℓ is in its own dtype)
    old = batch.old_logp[rows, cols].double()
    if batch.on_policy is not None:
        old = torch.where(batch.on_policy[rows, cols], logp, old)
    log_s_old = _mass_at(kept.old_log_mass, rows, cols)
    adv = batch.advantages[rows, cols].double()
    eps = (eps_low, eps_high)
    count = (ids >= 0).sum(-1)  # [M]
    mass = log_s.exp()
    ratios = [
        _ratio(
            "policy_ratio",
            "π_θ/π_old",
            "π̃_θ/π̃_old = (π_θ/π_old)·S^old/S^θ",
            logp - old,
            (logp - log_s) - (old - log_s_old),
            adv,
            eps,
        )
    ]
    if batch.rollout_logp is not None:
        sampler = batch.rollout_logp[rows, cols].double() - _mass_at(
            kept.rollout_log_mass, rows, cols
        )  # log μ̃(y)
        ratios.append(
            _ratio(
                "sampler_ratio",
                "π_θ/μ̃",
                "π̃_θ/μ̃",
                logp - sampler,
                (logp - log_s) - sampler,
                adv,
                eps,
            )
        )
    order = torch.argsort(log_s)[:LOWEST]
    empty = rows.numel() == 0
    p05, p50 = quantiles(mass, (0.05, 0.5))
    return SupportReport(
        rule=kept.rule,
        replayed=replayed,
        tokens=int(rows.numel()),
        kept_mean=None if empty else num(count.double().mean()),
        kept_min=None if empty else int(count.min()),
        kept_max=None if empty else int(count.max()),
        mass_mean=None if empty else num(mass.mean()),
        mass_min=None if empty else num(mass.min()),
        mass_p05=p05,
        mass_p50=p50,
        log_mass_mean=None if empty else num(log_s.mean()),
        old_mass_mean=None if kept.old_log_mass is None or empty else num(log_s_old.exp().mean()),
        rollout_mass_mean=None
        if kept.rollout_log_mass is None or empty
        else num(_mass_at(kept.rollout_log_mass, rows, cols).exp().mean()),
        ratios=ratios,
        lowest=[
            KeptToken(
                sequence=int(rows[i]),
                position=int(cols[i]),
                token=int(y[i]),
                kept=int(count[i]),
                mass=float(mass[i]),
                log_mass=float(log_s[i]),
            )
            for i in order.tolist()
        ],
    )
