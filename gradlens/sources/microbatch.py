"""Micro-batches of a forward with autograd through a causal LM, planned for a memory budget.

A forward with autograd keeps what its backward needs. For a micro-batch of n sequences of the
[N, L] grid with m loss tokens among them, the plan counts

    bytes(n, m) = n·s + m·V·4·k

- s, the bytes the transformer keeps per sequence, is measured, not guessed (`probe`): one
  sequence's forward with autograd runs under ``torch.autograd.graph.saved_tensors_hooks``,
  which sees every tensor saved for the backward; each storage is counted once, and the
  model's parameters are not counted (they are resident anyway). Every sequence of the grid
  has the same L positions (padding included), so s is the same for each. With activation
  checkpointing (`gradlens.sources.forward.checkpointed_blocks`) a block keeps only its input,
  L·H numbers, and recomputes the rest in the backward, one block at a time:
  s_ckpt = blocks·L·H·b + 2·s/blocks (the inputs, plus one block's intermediates during its
  recomputation, counted twice for the gradients the backward creates beside them).
- V·4·k is the logit path of one loss token in float32 (V the vocabulary): the logits and the
  log-softmax kept for the backward, and the gradient the backward creates (k = 3).

Sequences are packed in order into micro-batches of at most the budget; a sequence that alone
exceeds it is a micro-batch of its own (``over_budget`` says so). Because every loss of gradlens
touches the model only through the log-probs ℓ_t of the loss tokens, a gradient summed over
micro-batches is the gradient of the whole batch: ∂L/∂θ = Σ_b Σ_{t ∈ b} (∂L/∂ℓ_t)·∂ℓ_t/∂θ, with
∂L/∂ℓ_t evaluated at the whole batch's ℓ (`gradlens.sources.forward.grid_with`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradlens.containers import Sequences
from gradlens.engine.streamed import auto_budget
from gradlens.sources.forward import block_list, final_hidden

LOGIT_PATH_BUFFERS = 3  # [m, V] float32 buffers per loss token: logits, log-softmax, gradient
MODEL_PASS_CAP = 2 << 30  # the automatic budget of a pass through the model: at most 2 GiB


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which sequences go through the model together.

    Attributes:
        groups: the sequence indices of each micro-batch, in order.
        bytes_per_sequence: s (or s_ckpt) of the module docstring.
        bytes_per_token: V·4·k, the logit path of one loss token.
        budget_bytes: the budget the plan was made for.
        over_budget: some sequence alone exceeds the budget (it runs on its own anyway).
    """

    groups: list[list[int]]
    bytes_per_sequence: int
    bytes_per_token: int
    budget_bytes: int
    over_budget: bool

    @property
    def single(self) -> bool:
        """The whole batch in one forward."""
        return len(self.groups) == 1


def pass_budget(budget_bytes: int | None, device: torch.device) -> int:
    """The budget of a pass through the model: the configured one, or a quarter of the free
    memory, at most `MODEL_PASS_CAP`."""
    return budget_bytes if budget_bytes is not None else auto_budget(device, MODEL_PASS_CAP)


def probe(model: Any, seqs: Sequences, temperature: float, bias: bool) -> int:
    """s: the bytes one sequence's forward with autograd keeps for the backward (measured on
    the first sequence of ``seqs``; see the module docstring)."""
    resident = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        final_hidden(model, seqs.select([0]), temperature, bias)
    return sum(saved.values())


def checkpointed_bytes(per_sequence: int, model: Any, seqs: Sequences) -> int:
    """s_ckpt from s: block inputs plus one block recomputed at a time."""
    blocks = block_list(model)
    if blocks is None:
        return per_sequence
    count = len(blocks[1])
    hidden = int(model.get_input_embeddings().weight.shape[1])
    element = next(model.parameters()).element_size()
    length = int(seqs.input_ids.shape[1])
    return count * length * hidden * element + 2 * per_sequence // max(count, 1)


def sequence_bytes(per_sequence: int, vocab: int, tokens: int) -> int:
    """bytes(1, m) of the module docstring: one sequence with ``tokens`` loss tokens."""
    return per_sequence + vocab * 4 * LOGIT_PATH_BUFFERS * tokens


def plan_micro_batches(
    loss_tokens: list[int], per_sequence: int, vocab: int, budget_bytes: int
) -> MicroBatchPlan:
    """Pack the sequences (``loss_tokens[i]`` loss tokens in sequence i) in order."""
    per_token = vocab * 4 * LOGIT_PATH_BUFFERS
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    over = False
    for i, m in enumerate(loss_tokens):
        cost = per_sequence + per_token * m
        over = over or cost > budget_bytes
        if current and used + cost > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        groups.append(current)
    return MicroBatchPlan(groups, per_sequence, per_token, budget_bytes, over)


def loss_tokens(mask: torch.Tensor) -> list[int]:
    """Loss tokens of each sequence of an [N, T] mask."""
    return [int(n) for n in mask.sum(-1).tolist()]
