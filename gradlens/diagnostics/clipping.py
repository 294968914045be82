"""Diagnostic 5: the share of tokens each clip or mask rule switched off.

A loss reports its rules as named [N, T] regions (`LossTerms.regions`); each share is over the
valid tokens, token-weighted as verl and TRL average (slime averages per sample first):

    upper   A>0 ∧ r>1+eps_high    TRL clip_ratio/high_mean
    lower   A<0 ∧ r<1−eps_low     TRL clip_ratio/low_mean (not verl's pg_clipfrac_lower)
    region  upper ∪ lower          verl actor/pg_clipfrac = TRL clip_ratio/region_mean
                                   = OpenRLHF ppo_clip_ratio = slime pg_clipfrac
    dual    A<0 ∧ r>c              verl actor/pg_clipfrac_lower
    seq_masked_sequences / _tokens  DeepSeek-V3.2 OPSM (slime's opsm_clipfrac is a count)
    zero_grad                      c_t = 0 for any reason (A = 0 included)
    shares                         every region by name (the policy losses' and the
                                   corrections' own: weight_clipped, tis_truncated, ...)
    sequence_shares                share of sequences in each ``seq_`` region (whole-sequence
                                   rules: TRL's sequence-level clip_ratio for GSPO)
"""

from __future__ import annotations

from torch import Tensor

from gradlens.diagnostics.numbers import num
from gradlens.results import Clipping


def _share(region: Tensor | None, mask: Tensor) -> float | None:
    if region is None:
        return None
    return num((region & mask).sum().double() / mask.sum().clamp(min=1))


def clipping(regions: dict[str, Tensor], coefficient: Tensor, mask: Tensor) -> Clipping:
    """Shares of valid tokens in each region; ``coefficient`` is c_t on [N, T]."""
    upper, lower = regions.get("clip_upper"), regions.get("clip_lower")
    region = None if upper is None or lower is None else upper | lower
    seq = regions.get("seq_masked")
    seq_share = None
    if seq is not None:
        present = mask.any(-1)
        seq_share = num(seq.any(-1).sum().double() / present.sum().clamp(min=1))
    return Clipping(
        upper=_share(upper, mask),
        lower=_share(lower, mask),
        region=_share(region, mask),
        dual=_share(regions.get("clip_dual"), mask),
        seq_masked_sequences=seq_share,
        seq_masked_tokens=_share(seq, mask),
        zero_grad=num(((coefficient == 0) & mask).sum().double() / mask.sum().clamp(min=1)) or 0.0,
        shares={name: _share(r, mask) for name, r in regions.items()},
        sequence_shares={
            name: _sequence_share(r, mask) for name, r in regions.items() if name.startswith("seq_")
        },
    )


def _sequence_share(region: Tensor, mask: Tensor) -> float | None:
    present = mask.any(-1)
    return num((region & mask).any(-1).sum().double() / present.sum().clamp(min=1))
