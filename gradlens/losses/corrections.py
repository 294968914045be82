"""Training–inference corrections: a detached weight w_t on any loss's policy term.

Sources: TIS (Yao et al., fengyao.notion.site/off-policy-rl); MIS, Seq-MIS and the geometric
rejection mask ("When Speed Kills Stability", richardli.xyz/rl-collapse, and verl's
``docs/algo/rollout_corr_math.md``); IcePop (Ling team, ringtech.notion.site/icepop).

With the training–inference ratio ρ_t = π_old(y_t)/μ_old(y_t) = exp(ℓ_old − ℓ_rollout):

    kind        w_t                                     (low, high)   as in
    token_tis   clamp(ρ_t, low, high)                   (—, 2)        Yao et al.; verl token IS
    seq_tis     clamp(ρ_i, low, high), ρ_i = Π_t ρ_t    (—, 2)        verl rollout_is=sequence
    token_mis   ρ_t·1[low ≤ ρ_t ≤ high]                 (—, 3)        TRL token_mask
    seq_mis     ρ_i·1[low ≤ ρ_i ≤ high]                 (—, 3)        TRL sequence_mask (default)
    icepop      ρ_t·1[low ≤ ρ_t ≤ high]                 (0.5, 5)      OpenRLHF/slime icepop
    geo_mask    1[low ≤ exp(mean_t log ρ_t) ≤ high]     (0.999, 1.001)  verl seq_mean_k1

A bound left unset (—) is no bound. The per-token loss becomes w_t·(policy term) and the
per-token gradient w_t·g_t: the logit gradient keeps the direction e_y − π and stays zero-sum. A
loss's penalty (``grpo``'s KL, `LossTerms.penalty`) is not weighted, as in every framework. On
a sequence-level loss (GSPO) a token weight acts through its sequence mean, which gives the same
loss and gradient because the per-token value and the aggregation weight are constant within
the sequence. Several corrections multiply.

``icepop`` and ``token_mis`` are the same weight; they differ in their default thresholds only.
Trap A8: verl's k1 rejection options threshold −log ρ, so verl's ``"lo_hi"`` equals gradlens's
[lo, hi] only when lo = 1/hi. OpenRLHF's ``seq-mask-tis`` is ``geo_mask`` times an *unclamped*
token ρ (A13): compose ``geo_mask`` with ``token_mis`` with no bounds to reproduce it.

Each correction reports the tokens it truncated or masked as a region (``tis_truncated``,
``seq_tis_truncated``, ``mis_masked``, ``seq_mis_masked``, ``icepop_masked``,
``seq_geo_masked``); names starting with ``seq_`` are also reported per sequence.

verl's rejection options (``rollout_rs``, `rollout_corr_helper.compute_rollout_rejection_mask`),
each a kind of its own, w_t = 1[keep] (chain several by listing them: the weights multiply, so a
token is kept only when every option keeps it, as verl's comma-separated chain). With
ℓρ = clamp(log ρ_t, −20, 20) (verl's safety bound) and the per-token estimators

    k1_t = −ℓρ        k2_t = ½·ℓρ²        k3_t = e^{ℓρ} − 1 − ℓρ

the statistic is the token's own k (``token_k1|k2|k3``), or its sequence's sum, mean or max over
the valid tokens (``seq_sum_k*``, ``seq_mean_k*``, ``seq_max_k2|k3``; an empty sequence's max is
0). The k2/k3 options keep stat ≤ high (``low`` must be unset); the k1 options keep
ln(low) ≤ stat ≤ ln(high), with low = 1/high when unset — verl's ``"low_high"`` ratio bounds,
which on −log ρ keep 1/high ≤ ρ ≤ 1/low (trap A8). verl has no default threshold, so ``high``
is required. verl always removes the rejected tokens from the response mask: set
``renormalize: true`` to reproduce it (below). ``seq_mean_k1`` with (1/hi, 1/lo) is ``geo_mask``
with (lo, hi).

``seq_mask_tis`` (NeMo RL's ``truncated_importance_sampling_type: seq-mask-tis``, OpenRLHF's
``seq-mask-tis``): w_t = ρ_t·1[low ≤ exp(mean_t log ρ_t) ≤ high], the geometric-mean filter
times the *unclamped* token ρ (trap A13), defaults (0.999, 1.002), NeMo's reference bounds.

AReaL's ``RejectionSamplingConfig`` (``areal/utils/functional/functional.py``
``apply_rejection_sampling``, ``ppo_actor_loss_fn``) always weights by the behaviour importance
ratio and masks or clamps it; each of its (level, agg, metric, action) is a kind
``areal_<level>_<metric>`` (``_clamp`` for action clamp):

    level       token, seq_sum, seq_mean, seq_max  (AReaL level=sequence with agg sum|mean|max)
    metric      ratio: M = ρ_t, aggregated in log space (exp of the sum, mean or max of log ρ)
                k1 = log ρ, k2 = ½·log²ρ, k3 = 1/ρ − 1 + log ρ: aggregated as they are
    weight      ρ_t, except level ≠ token with metric ratio: the geometric mean ρ̄_i on every token
    mask        w = weight·1[low ≤ M ≤ high] (low unset: no lower bound); default high 5 (AReaL's)
    clamp       (metric ratio only) where M is out of bounds, w = clamp(weight, low or 0, high)

AReaL's k1 is +log ρ (verl's is −log ρ), and its k3 is the estimator with the ratio inverted
(AReaL's help text says r − log r − 1; the code computes 1/r − 1 + log r; gradlens follows the
code). AReaL keeps the rejected tokens in its token-mean denominator (``renormalize: false``).
``areal_token_ratio`` is ``token_mis`` and ``areal_token_ratio_clamp`` ``token_tis`` with
low 0; they are listed under AReaL's names too.

Batch-normalised IS weights (verl ``rollout_is_batch_normalize``): ``batch_normalize: true`` on a
kind whose weight is an importance ratio divides it by its batch mean — over the valid tokens for
a token-level weight, over the valid sequences for a sequence-level one (each sequence's weight
counted once) — unless that mean is ≤ 1e-8. The mean includes the zeros of a masking kind, as
verl's does.

Bypass mode (verl ``bypass_mode``, `gradlens.losses.base.LossParams.bypass_mode`): the rollout
log-probs replace π_old (no recomputed old policy: PPO's r becomes π_θ/μ), and every correction
measures sg[π_θ]/μ instead of π_old/μ, so ρ_t = exp(sg[ℓ_t] − ℓ_μ,t): still detached, now
moving with π_θ. verl's ``loss_type: reinforce`` is ``reinforce`` with an IS kind (g = −A·w);
its ``ppo_clip`` is ``ppo_clip`` with rejection kinds only (verl computes but does not apply the
IS weight there: adding one counts ρ twice).

Renormalising rejection. A masking kind (token_mis, seq_mis, icepop, geo_mask) zeroes w_t on
the tokens it rejects but leaves them in the aggregation's normaliser: under ``token_mean`` a
kept token still weighs 1/N_tok. verl's rejection sampling (``rollout_rs``) instead removes the
rejected tokens from the response mask, so the normaliser shrinks with them: 1/N_kept under
token-mean (a factor N_tok/N_kept on every kept token), 1/B'_kept for the sequence means.
``renormalize: true`` on a correction does the same here: `kept_mask` is the mask every
aggregation weight (and the entropy bonus) is computed from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from gradlens.containers import LossTerms, TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.base import Correction
from gradlens.losses.off_policy_mask import sequence_mean


def _outside(x: Tensor, low: float | None, high: float | None) -> Tensor:
    out = torch.zeros_like(x, dtype=torch.bool)
    if low is not None:
        out |= x < low
    if high is not None:
        out |= x > high
    return out


def _clamp(x: Tensor, low: float | None, high: float | None) -> Tensor:
    return torch.clamp(x, min=low, max=high)


def _seq(values: Tensor, like: Tensor) -> Tensor:
    return values[:, None].expand_as(like)  # [N] → [N, T]


def _token_tis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho = torch.exp(log_rho)
    return _clamp(rho, c.low, c.high), _outside(rho, c.low, c.high)


def _seq_tis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho_seq = _seq(torch.exp(log_rho.sum(-1)), log_rho)  # Π_t ρ_t (masked log ρ are 0)
    return _clamp(rho_seq, c.low, c.high), _outside(rho_seq, c.low, c.high)


def _token_mask(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho = torch.exp(log_rho)
    out = _outside(rho, c.low, c.high)
    return torch.where(out, 0.0, rho), out


def _seq_mis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    rho_seq = _seq(torch.exp(log_rho.sum(-1)), log_rho)
    out = _outside(rho_seq, c.low, c.high)
    return torch.where(out, 0.0, rho_seq), out


def _geo_mask(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    geo = _seq(torch.exp(sequence_mean(log_rho, mask)), log_rho)
    out = _outside(geo, c.low, c.high)
    return (~out).to(log_rho.dtype), out


WeightFn = Callable[[Tensor, Tensor, Correction], tuple[Tensor, Tensor]]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One correction kind: its weight, default thresholds, region name and description."""

    fn: WeightFn
    low: float | None
    high: float | None
    region: str
    formula: str
    masks: bool  # its region is a rejection (w = 0), not a truncation: it can renormalize
    level: str = "token"  # "sequence": one weight per sequence (batch_normalize counts it once)
    weighs: bool = True  # w is an importance ratio (batch_normalize applies), not a 0/1 mask
    needs_high: bool = False  # no default upper threshold: the config must give one
    takes_low: bool = True  # a lower threshold means something


def _seq_mask_tis(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
    geo = _seq(torch.exp(sequence_mean(log_rho, mask)), log_rho)
    out = _outside(geo, c.low, c.high)
    return torch.where(out, 0.0, torch.exp(log_rho)), out


SAFETY_BOUND = 20.0  # verl clamps log ρ to ±20 before its rejection statistics


def _sequence_stat(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """[N, T] → [N, T]: each sequence's sum, mean or max of ``values`` over its valid tokens,
    repeated on its tokens ("token": ``values`` itself; an empty sequence's max is 0)."""
    if how == "token":
        return values
    m = mask.to(values.dtype)
    if how == "sum":
        seq = (values * m).sum(-1)
    elif how == "mean":
        seq = sequence_mean(values, mask)
    else:
        peak = torch.where(mask, values, -torch.inf).amax(-1)  # [N]
        seq = torch.where(mask.any(-1), peak, 0.0)
    return _seq(seq, values)


VERL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda lr: -lr,
    "k2": lambda lr: 0.5 * lr**2,
    "k3": lambda lr: torch.exp(lr) - 1.0 - lr,
}


def _verl_rejection(how: str, estimator: str) -> WeightFn:
    """verl's rejection option ``<level>_<estimator>``: w = 1[keep] (module docstring)."""

    def fn(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
        if c.high is None:
            raise GradlensError(f"correction {c.kind} needs a threshold high (verl has none)")
        lr = log_rho.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        stat = _sequence_stat(VERL_ESTIMATORS[estimator](lr), mask, how)
        if estimator == "k1":
            low = c.low if c.low is not None else 1.0 / c.high
            out = (stat < math.log(low)) | (stat > math.log(c.high))
        else:
            out = stat > c.high
        return (~out).to(log_rho.dtype), out

    return fn


AREAL_METRICS: dict[str, Callable[[Tensor], Tensor]] = {
    "ratio": lambda lr: lr,  # aggregated in log space, compared as exp(·)
    "k1": lambda lr: lr,
    "k2": lambda lr: 0.5 * lr**2,
    "k3": lambda lr: torch.exp(-lr) - 1.0 + lr,
}


def _areal(how: str, metric: str, clamp: bool) -> WeightFn:
    """AReaL's rejection sampling at one (level, metric, action) (module docstring)."""

    def fn(log_rho: Tensor, mask: Tensor, c: Correction) -> tuple[Tensor, Tensor]:
        stat = _sequence_stat(AREAL_METRICS[metric](log_rho), mask, how)
        if metric == "ratio":
            stat = torch.exp(stat)
        weight = torch.exp(log_rho)
        if metric == "ratio" and how != "token":  # the geometric mean on every token
            weight = _seq(torch.exp(sequence_mean(log_rho, mask)), log_rho)
        out = _outside(stat, c.low, c.high)
        if not clamp:
            return torch.where(out, 0.0, weight), out
        clamped = torch.where(out, _clamp(weight, c.low or 0.0, c.high), weight)
        return clamped, clamped != weight

    return fn


KINDS: dict[str, Kind] = {
    "token_tis": Kind(_token_tis, None, 2.0, "tis_truncated", "clamp(ρ_t, low, high)", False),
    "seq_tis": Kind(
        _seq_tis, None, 2.0, "seq_tis_truncated", "clamp(Π_t ρ_t, low, high)", False, "sequence"
    ),
    "token_mis": Kind(_token_mask, None, 3.0, "mis_masked", "ρ_t·1[low ≤ ρ_t ≤ high]", True),
    "seq_mis": Kind(
        _seq_mis,
        None,
        3.0,
        "seq_mis_masked",
        "Π_t ρ_t·1[low ≤ Π_t ρ_t ≤ high]",
        True,
        "sequence",
    ),
    "icepop": Kind(_token_mask, 0.5, 5.0, "icepop_masked", "ρ_t·1[low ≤ ρ_t ≤ high]", True),
    "geo_mask": Kind(
        _geo_mask,
        0.999,
        1.001,
        "seq_geo_masked",
        "1[low ≤ exp(mean_t log ρ_t) ≤ high]",
        True,
        "sequence",
        weighs=False,
    ),
    "seq_mask_tis": Kind(
        _seq_mask_tis,
        0.999,
        1.002,
        "seq_mask_tis_masked",
        "ρ_t·1[low ≤ exp(mean_t log ρ_t) ≤ high] (NeMo RL, OpenRLHF seq-mask-tis)",
        True,
    ),
}


def _verl_kinds() -> dict[str, Kind]:
    """verl's eleven rejection options, each a kind under verl's name."""
    kinds = {}
    for how, estimators in (("token", "123"), ("sum", "123"), ("mean", "123"), ("max", "23")):
        for k in estimators:
            option = f"token_k{k}" if how == "token" else f"seq_{how}_k{k}"
            stat = f"k{k}_t" if how == "token" else f"{how}_t k{k}"
            rule = f"ln low ≤ {stat} ≤ ln high" if k == "1" else f"{stat} ≤ high"
            kinds[option] = Kind(
                _verl_rejection(how, f"k{k}"),
                None,
                None,
                f"rs_{option}_masked" if how == "token" else f"seq_rs_{how}_k{k}_masked",
                f"1[{rule}] (verl rollout_rs {option})",
                True,
                "token" if how == "token" else "sequence",
                weighs=False,
                needs_high=True,
                takes_low=k == "1",
            )
    return kinds


def _areal_kinds() -> dict[str, Kind]:
    """AReaL's rejection sampling, one kind per (level, agg, metric, action)."""
    kinds = {}
    for how in ("token", "sum", "mean", "max"):
        level = "token" if how == "token" else f"seq_{how}"
        for metric in AREAL_METRICS:
            for clamp in (False, True) if metric == "ratio" else (False,):
                region = "areal_clamped" if clamp else "areal_masked"
                words = "level=token" if how == "token" else f"level=sequence, agg={how}"
                kl = metric if metric == "ratio" else f"kl_{metric}"
                kinds[f"areal_{level}_{metric}" + ("_clamp" if clamp else "")] = Kind(
                    _areal(how, metric, clamp),
                    None,
                    5.0,
                    region if how == "token" else f"seq_{region}",
                    f"AReaL {words}, metric={kl}, action={'clamp' if clamp else 'mask'}",
                    not clamp,
                    "sequence" if metric == "ratio" and how != "token" else "token",
                )
    return kinds


KINDS.update(_verl_kinds())
KINDS.update(_areal_kinds())
MASKING_KINDS = tuple(name for name, kind in KINDS.items() if kind.masks)


def with_defaults(
    kind: str,
    low: float | None,
    high: float | None,
    renormalize: bool = False,
    batch_normalize: bool = False,
) -> Correction:
    """A `Correction` whose unset thresholds take the kind's defaults."""
    k = KINDS[kind]
    return Correction(
        kind,
        k.low if low is None else low,
        k.high if high is None else high,
        renormalize,
        batch_normalize,
    )


def correction_problem(c: Correction) -> str | None:
    """What is wrong with ``c`` given its kind's rules, or None."""
    kind = KINDS[c.kind]
    if c.renormalize and not kind.masks:
        return (
            f"renormalize applies to the kinds that reject tokens ({', '.join(MASKING_KINDS)}); "
            f"{c.kind} truncates a weight and rejects none"
        )
    if c.batch_normalize and not kind.weighs:
        return f"batch_normalize applies to importance weights; {c.kind} is a 0/1 mask"
    if kind.needs_high and c.high is None:
        return f"{c.kind} needs a threshold high (verl's rollout_rs_threshold has no default)"
    if not kind.takes_low and c.low is not None:
        return f"{c.kind} takes an upper threshold only (high); low must be unset"
    return None


def log_ratio(inputs: TokenInputs, bypass: bool = False) -> Tensor:
    """[N, T] log ρ_t = ℓ_old − ℓ_μ (0 at masked positions), or sg[ℓ] − ℓ_μ in bypass mode."""
    assert inputs.rollout_logp is not None
    anchor = inputs.logp.detach() if bypass else inputs.old_logp
    return torch.where(inputs.mask, anchor - inputs.rollout_logp, 0.0)


def correction_weight(
    inputs: TokenInputs, c: Correction, bypass: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """[N, T] detached weight w_t of one correction and its region; needs ``rollout_logp``."""
    m = inputs.mask
    kind = KINDS[c.kind]
    weight, out = kind.fn(log_ratio(inputs, bypass), m, c)
    weight = torch.where(m, weight, 0.0)
    if c.batch_normalize:
        weight = weight / _batch_mean(weight, m, kind.level)
    return weight, {kind.region: out & m}


def _batch_mean(weight: Tensor, mask: Tensor, level: str) -> Tensor:
    """The divisor of ``batch_normalize``: the mean weight over the valid tokens, or over the
    valid sequences (one weight each), and 1 when that mean is ≤ 1e-8 (verl)."""
    m = mask.to(weight.dtype)
    if level == "sequence":
        valid = mask.any(-1).to(weight.dtype)  # [N]
        mean = (sequence_mean(weight, mask) * valid).sum() / valid.sum().clamp(min=1.0)
    else:
        mean = (weight * m).sum() / m.sum().clamp(min=1.0)
    return torch.where(mean > 1e-8, mean, torch.ones_like(mean))


def missing_rollout(corrections: tuple[Correction, ...]) -> str:
    """Why corrections cannot run on a batch without rollout log-probs, and what to set."""
    kinds = ", ".join(c.kind for c in corrections)
    return (
        f"loss.corrections ({kinds}) need the rollout log-probs μ_old of the inference engine, "
        "and this batch has none: set source.rollout_drift (synthetic source), rollout_prob / "
        "rollout_logp on the positions (literal source), or store 'rollout_log_probs' in the "
        "batch file"
    )


def kept_mask(
    inputs: TokenInputs, corrections: tuple[Correction, ...], bypass: bool = False
) -> Tensor:
    """[N, T] the mask without the tokens a renormalising correction rejects (the mask every
    aggregation weight is computed from); the mask itself when no correction renormalises."""
    mask = inputs.mask
    renormalizing = tuple(c for c in corrections if c.renormalize)
    if not renormalizing or inputs.rollout_logp is None:  # apply_corrections stops that run
        return mask
    log_rho = log_ratio(inputs, bypass)
    kept = mask.clone()
    for c in renormalizing:
        _, out = KINDS[c.kind].fn(log_rho, mask, c)
        kept &= ~out
    return kept


def apply_corrections(
    terms: LossTerms,
    inputs: TokenInputs,
    corrections: tuple[Correction, ...],
    bypass: bool = False,
) -> LossTerms:
    """``terms`` with the policy part weighted by every correction (unchanged without any).

    A loss that aggregates itself (a user or verl-shaped function) is left as it is: its
    per-token structure is its own; it receives ``rollout_logp`` and can weight it itself.
    ``bypass``: the ratio is sg[π_θ]/μ (verl's bypass mode; the module docstring).
    """
    if not corrections or terms.self_aggregated:
        return terms
    if inputs.rollout_logp is None:
        raise GradlensError(missing_rollout(corrections))
    m = inputs.mask
    weight = torch.ones_like(inputs.old_logp)
    regions = dict(terms.regions)
    for c in corrections:
        w, region = correction_weight(inputs, c, bypass)
        weight = weight * w
        regions.update(region)
    return weight_policy_part(terms, weight, m, regions)


def weight_policy_part(
    terms: LossTerms, weight: Tensor, mask: Tensor, regions: dict[str, Tensor]
) -> LossTerms:
    """``terms`` with the policy part (per-token value and g_t minus the penalty's) multiplied
    by ``weight`` [N, T], the penalty left as it is; a sequence-level loss gets each sequence's
    mean weight. ``regions``: the result's regions."""
    if terms.sequence_level:
        weight = sequence_mean(weight, mask)[:, None].expand_as(weight)
    weight = torch.where(mask, weight, 0.0)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    penalty = terms.penalty if terms.penalty is not None else zero
    penalty_g = terms.penalty_grad if terms.penalty_grad is not None else zero
    return dataclasses.replace(
        terms,
        per_token=weight * (terms.per_token - penalty) + penalty,
        per_token_grad=weight * (terms.per_token_grad - penalty_g) + penalty_g,
        regions=regions,
    )
