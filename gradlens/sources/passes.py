"""The model source's known sources of mismatch, as passes the switches choose between.

Two passes that compute the same log-probs of the same tokens at the same parameters differ
only in how they are computed; each pair below is a switch of ``source: {kind: model}``:

``source.rollout_logprobs`` — where μ comes from:

    cache   the sampler's own log-probs: one position at a time against a key-value cache
            (gradlens.sources.rollout), as an inference engine returns them
    full    one forward over each whole sampled sequence (no cache) of the same rollout copy of
            the model, in the same dtype: `full_sequence_logp`

``source.train_pass`` — how the training pass scores the sequences for π_old:

    batch   together, in padded micro-batches (prompts left-padded, completions right-padded),
            as a trainer does (gradlens.sources.staleness)
    alone   each sequence by itself, its padding removed (a batch of one): `score_alone`; the
            difference from ``batch`` is what batch composition alone does (TRL issue 6789:
            the same sequence scored in a chunk of 1 and of 8 moves 8 % of the bf16 tokens
            outside ρ ∈ [0.9, 1.1])

In exact arithmetic each pair is equal (positions count real tokens only, padding is masked
out of attention); in float64 they agree to rounding (~1e-15 per operation), and the
differences in float32 and bfloat16 are the mismatch these choices cause. The log-probs are
computed with the logits upcast to at least float32, as the sampler does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradlens.containers import Sequences
from gradlens.grads import policy_pass
from gradlens.sources.forward import final_hidden, head_weight, position_ids


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model: the sampler's logits precision."""
    return torch.promote_types(dtype, torch.float32)


def own_logits(model: nn.Module, seqs: Sequences) -> Tensor:
    """[N, T, V] the model's own logits z_t (its forward, transformers' code alone, without a
    cache) at the positions that predict the next token, in the model's dtype."""
    out = model(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
        use_cache=False,
    )
    return out.logits[:, :-1]


def sampled_logp(logits: Tensor, seqs: Sequences, temperature: float) -> Tensor:
    """[N, T] log softmax(z/T)(y_t) of the sampled tokens from logits [N, T, V] (0 off
    ``seqs.loss_mask``); the softmax in `accumulation_dtype`."""
    logits = logits.to(accumulation_dtype(logits.dtype)) / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, seqs.tokens[..., None]).squeeze(-1)
    return torch.where(seqs.loss_mask, logp, torch.zeros_like(logp))


@torch.no_grad()
def full_sequence_logp(model: nn.Module, seqs: Sequences, temperature: float) -> Tensor:
    """[N, T] log softmax(z/T)(y_t) of the sampled tokens by one forward without a cache (0 off
    ``seqs.loss_mask``)."""
    return sampled_logp(own_logits(model, seqs), seqs, temperature)


@torch.no_grad()
def score_alone(model: nn.Module, seqs: Sequences, temperature: float, bias: bool) -> Tensor:
    """[N, T] log π(y_t) of the training pass (z = W·h/T) with each sequence scored alone,
    without its padding (its real tokens are contiguous: left-padded prompt, right-padded
    completion), put back on the batch's grid (0 off ``seqs.loss_mask``)."""
    weight = head_weight(model)
    out = torch.zeros(seqs.loss_mask.shape, dtype=accumulation_dtype(weight.dtype))
    out = out.to(seqs.input_ids.device)
    for i in range(int(seqs.input_ids.shape[0])):
        real = seqs.attention_mask[i].bool()
        start = int(real.nonzero()[0])
        ids = seqs.input_ids[i][real][None]  # [1, L_i]
        length = int(ids.shape[1])
        if length < 2:
            continue
        ones = torch.ones_like(ids)
        mask = seqs.loss_mask[i, start : start + length - 1][None]  # [1, L_i − 1]
        one = Sequences(ids, ones, position_ids(ones), mask)
        hidden = final_hidden(model, one, temperature, bias)
        logp = policy_pass(hidden, weight, one.tokens, mask).logp  # [1, L_i − 1]
        out[i, start : start + length - 1] = logp[0].to(out.dtype)
    return torch.where(seqs.loss_mask, out, torch.zeros_like(out))
