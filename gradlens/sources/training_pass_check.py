"""The model source's training pass, checked against the model's own forward.

π_old comes from gradlens's training pass (`gradlens.sources.staleness`): the final hidden
states of `gradlens.sources.forward.final_hidden` — through the shared-prefix packing, the
micro-batches, activation checkpointing and the tied embedding's in-place gradient lookup —
times the lm_head weight, by gradlens's own product. The model's forward (``model(ids).logits``,
transformers' code alone) computes the log-probs of the same tokens at the same θ_old in the
same dtype; the two differ only in the order of their operations. On the first sequence, before
the stale steps move θ,

    |log π_old(y_t) − log softmax(z_t/T)(y_t)|  ≤  2·ε·max_{t,v} |z_t,v| / T

for every completion token t, with ε the relative logit tolerance of
`gradlens.sources.forward.check_logit_path` (1e-4 in float32, 1e-9 in float64, 3e-2 in the 16-bit
types: the same products rounded in another order), since a log-softmax moves by at most twice
the largest change of its inputs. A pass that reads other weights, drops a module's own
computation or misplaces a position is off by nats, not by rounding: an embedding lookup that
lost Gemma 3's √H scaling put the mean log π_old at −11.9 against the model's −0.46 on the same
tokens, and every ratio, coefficient and gradient of the report with it. So a failure is
gradlens's bug (or a model its passes cannot run), raised as an internal error, never a
diagnosis.

The rollout's μ is checked the same way against the rollout copy's own forward, in the rollout
dtype: the sampler's log-probs come from gradlens's loop over a key-value cache (each prompt
prefilled once, its rows repeated for the group), which must give the model's probabilities of
the tokens it sampled, to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradlens.containers import Sequences
from gradlens.sources.forward import LOGIT_PATH_TOLERANCE, LOGIT_PATH_TOLERANCE_LOW
from gradlens.sources.passes import own_logits, sampled_logp


class TrainingPassMismatch(RuntimeError):
    """gradlens's training pass does not reproduce the model's own forward (a gradlens bug)."""


@dataclass(frozen=True)
class ReferencePass:
    """The model's own log-probs of one sequence's completion tokens at θ_old."""

    logp: Tensor  # [T] log softmax(z/T)(y_t) on the batch's grid row, 0 off ``mask``
    mask: Tensor  # [T] bool, the completion tokens in the loss
    bound: float  # 2·ε·max|z|/T: the largest difference rounding explains


@torch.no_grad()
def reference_pass(model: nn.Module, seqs: Sequences, temperature: float) -> ReferencePass:
    """The model's own forward over ``seqs``' first sequence, in the model's dtype, as the
    check's reference (module docstring)."""
    first = seqs.select([0])
    logits = own_logits(model, first)  # [1, T, V]
    eps = LOGIT_PATH_TOLERANCE.get(logits.dtype, LOGIT_PATH_TOLERANCE_LOW)
    bound = 2.0 * eps * float(logits.abs().max()) / temperature
    return ReferencePass(sampled_logp(logits, first, temperature)[0], first.loss_mask[0], bound)


def check_training_pass(
    reference: ReferencePass,
    old_logp: Tensor,
    what: str = "the training pass's log-probs (log π_old)",
) -> None:
    """Raise `TrainingPassMismatch` when ``what``'s log-probs of the first sequence ([T], on the
    grid) are off the model's own beyond `ReferencePass.bound`."""
    mask = reference.mask.to(old_logp.device)
    if not bool(mask.any()):
        return
    diff = (old_logp.double() - reference.logp.to(old_logp.device).double()).abs()
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    worst = int(diff.argmax())
    if float(diff[worst]) <= reference.bound:
        return
    ours, theirs = float(old_logp[mask].double().mean()), float(reference.logp[mask].mean())
    raise TrainingPassMismatch(
        f"{what} of sequence 0 are not the model's own forward's: "
        f"|Δ log p| = {float(diff[worst]):.3g} at grid position {worst}, more "
        f"than the {reference.bound:.3g} rounding explains (mean log-prob {ours:.4g} against "
        f"the model's {theirs:.4g}); every number of the report would be of another model"
    )
