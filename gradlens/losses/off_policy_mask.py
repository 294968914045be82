"""DeepSeek-V3.2's off-policy sequence mask (OPSM; arXiv 2512.02556 §3.1, eq. 9).

A whole sequence i is switched off when its advantage is negative and the policy has drifted
too far from the one that sampled it:

    M_seq_i = 0  iff  Â_i < 0  and  (1/|o_i|) Σ_t (ℓ_μ,t − ℓ_θ,t) > δ,   else 1.

The statistic is the sequence mean of log(π_rollout/π_θ); the paper's π_old is the
inference-engine probability, so the rollout log-prob is used when the source has one, and
the training-engine ℓ_old otherwise (slime's default; losses.md trap A3). The sequence's
advantage is the mean of its token advantages (identical for outcome rewards). The mask is a
constant: it multiplies the per-token coefficient and has no gradient of its own.
"""

from __future__ import annotations

from torch import Tensor

from gradlens.containers import TokenInputs


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[N, T] → [N]: mean over each sequence's valid tokens (0 for an empty sequence)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def off_policy_sequence_mask(inputs: TokenInputs, delta: float) -> Tensor:
    """[N, T] bool: True at the valid tokens of the sequences that OPSM removes."""
    behaviour = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.old_logp
    drift = sequence_mean(behaviour - inputs.logp.detach(), inputs.mask)  # [N]
    seq_adv = sequence_mean(inputs.advantages, inputs.mask)  # [N]
    removed = (seq_adv < 0) & (drift > delta)  # [N]
    return removed[:, None] & inputs.mask
