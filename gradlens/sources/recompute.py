"""Final hidden states recomputed from a batch file's token ids (``source.model_path``).

A rollout batch as verl keeps it holds token ids and log-probs, not the final hidden states the
lm_head analysis needs. With ``source: {kind: batch, path: FILE, model_path: DIR}`` the
checkpoint at DIR (``builtin``: the tiny model shipped with gradlens) is loaded exactly as the
model source loads it (`gradlens.sources.model.load_checkpoint`: local files only, the run's
``dtype`` and ``device``) and run once over prompt + response:

    sequence  = prompts [N, P] (left-padded) ++ responses [N, T] (right-padded)   [N, P+T]
    positions = cumsum(attention mask) − 1: left padding shifts nothing
    h_t       = final hidden state (after the final norm) at column P + t − 1, divided by the
                temperature: the state whose logits W·h_t predict response token t

so the batch is the one a file storing those hidden states would give, on the same [N, T]
grid. The lm_head weight is the checkpoint's (with a bias, W gains it as a last column and h a
constant 1, as in the model source). Columns of left padding shared by every sequence are
dropped before the forward, which runs in groups of sequences of at most `TOKENS_PER_PASS`
tokens. Responses to one prompt (a GRPO group: verl repeats each prompt n times) go through in
one row after a single copy of the prompt (``source.shared_prefix``, on by default:
`gradlens.sources.shared_prefix`, checked on the model first, used where it saves positions),
in the recompute and in the whole-model gradients; the hidden states are the padded grid's up
to rounding.

With ``whole_model`` (``source.whole_model``, on by default with a checkpoint) the model and
the sequences are kept in a `ModelContext` on the batch, and every loss also runs through the
whole model (`gradlens.diagnostics.model_grads`: per-tensor-group norms, the total norm a
trainer logs as grad_norm). Its forward reads the same [N, P+T] sequences (shared left padding
dropped, the same position ids) in one pass with autograd, and takes the final hidden states
from column P − 1 on (``ModelContext.offset``), divided by T: the [N, T] grid of the batch, so
its lm_head gradient is the one the lm_head diagnostics compute in closed form. The report's
``model`` section then has the checkpoint and the gradients, without the model source's rollout,
mismatch and staleness, which a file does not have. Without ``whole_model`` the model is
released once the hidden states are taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import LoadedModel, ModelContext, Sequences
from gradlens.errors import GradlensError
from gradlens.progress import report
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import check_logit_path, final_hidden, head_weight, position_ids
from gradlens.sources.shared_prefix import padded_note, with_shared_prefix

KEY = "source.model_path"
BUILTIN = "builtin"  # model_path naming the shipped tiny model
TOKENS_PER_PASS = 1 << 15  # prompt + response tokens per forward pass
LOGIT_CHECK_TOKENS = 64  # tokens of the first sequence used to check z = W·h


@dataclass(frozen=True)
class Recomputed:
    hidden: Tensor  # [N, T, H(+1)] h_t/T, zero at the positions outside the loss
    weight: Tensor  # [V, H(+1)]
    description: str
    context: ModelContext | None = None  # with whole_model: the model and the sequences
    tokenizer: Any = None  # the checkpoint's tokenizer


# The settings that ask for whole-model gradients, as errors name them (engine: streamed)
WHOLE_MODEL_KEYS = "source.model_path with source.whole_model: true; set it false to stream"


def recompute_hidden(
    model_path: str,
    data: Mapping[str, Tensor],
    file_name: str,
    temperature: float,
    device: torch.device,
    dtype: torch.dtype,
    whole_model_of: str | None = None,
    shared_prefix: bool = True,
) -> Recomputed:
    """The hidden states and lm_head weight of the batch ``data`` (`read_batch_tensors` with
    ``prompts=True``) under the checkpoint at ``model_path``.

    ``whole_model_of``: the batch file's path (named in the report), to keep the model and the
    sequences for the whole-model gradients (`Recomputed.context`); None releases the model.
    ``shared_prefix``: the forwards pack the responses to one prompt after one copy of it
    (`gradlens.sources.shared_prefix.with_shared_prefix`). ``file_name``: the batch file, named
    when its ``tokenizer_sha256`` is not the checkpoint tokenizer's (refused before the model
    loads).
    """
    digest = data.get("tokenizer_sha256")  # the file's ids must be the checkpoint tokenizer's
    loaded = load_checkpoint(
        None if model_path == BUILTIN else model_path,
        device,
        dtype,
        KEY,
        made_ids=None if digest is None else (digest, file_name),
    )
    tokens, mask = data["tokens"], data["mask"]  # [N, T]
    prompt_ids, prompt_mask = data["prompt_ids"], data["prompt_mask"]  # [N, P]
    attention = torch.cat([prompt_mask, data["response_attention"]], dim=1)  # [N, P+T]
    check_tokens(loaded, prompt_ids, prompt_mask, tokens, mask, data["response_attention"])
    check_layout(loaded, prompt_mask, mask, attention)

    n = tokens.shape[0]
    p = prompt_ids.shape[1]
    real = prompt_mask.any(dim=0).nonzero()
    first = int(real[0]) if real.numel() else p - 1  # left padding every sequence has: dropped
    ids = torch.cat([prompt_ids, tokens], dim=1)[:, first:]
    attention = attention[:, first:]
    ids = ids.masked_fill(~attention, 0)  # pad ids may lie outside the vocabulary
    p -= first
    width = ids.shape[1]

    row = attention[0].nonzero().squeeze(-1)[:LOGIT_CHECK_TOKENS]
    if row.numel() > 1:
        check_logit_path(loaded, ids[0, row].tolist(), device, KEY)

    loss_grid = torch.zeros(n, width - 1, dtype=torch.bool)
    loss_grid[:, p - 1 :] = mask
    seqs = Sequences(
        ids.to(device),
        attention.long().to(device),
        position_ids(attention).to(device),
        loss_grid.to(device),
    )
    problem = None
    if shared_prefix:
        seqs, problem = with_shared_prefix(loaded.model, seqs)
    step = max(1, TOKENS_PER_PASS // width)
    parts = []
    with torch.no_grad():
        for start in range(0, n, step):
            report("recompute", start, n)
            part = seqs.select(list(range(start, min(start + step, n))))
            h = final_hidden(loaded.model, part, temperature, loaded.bias)  # [n, P+T−1, H]
            parts.append(h[:, p - 1 :])  # column P + t − 1 predicts response token t
        report("recompute", n, n)
    hidden = torch.cat(parts)  # [N, T, H(+1)]
    hidden = torch.where(mask.to(device)[..., None], hidden, torch.zeros_like(hidden))
    weight = head_weight(loaded.model).detach().clone()
    label = "the built-in model" if loaded.builtin else loaded.path.name
    description = (
        f"hidden states recomputed by {label} ({type(loaded.model).__name__}"
        f"{f', T = {temperature:g}' if temperature != 1.0 else ''}) from the prompt + response "
        "token ids"
    )
    if seqs.share_prefix:
        description += "; the responses to one prompt after one copy of it"
    notes = []
    if problem is not None:
        notes.append(padded_note(problem))
        description += f"; {notes[-1]}"
    context = None
    if whole_model_of is not None:
        context = ModelContext(
            loaded,
            seqs,
            temperature,
            str(dtype).removeprefix("torch."),
            offset=p - 1,
            keys=WHOLE_MODEL_KEYS,
            batch_file=whole_model_of,
            notes=notes,
        )
        description += "; every loss also runs through the whole model"
    return Recomputed(hidden, weight, description, context, loaded.tokenizer)


def check_tokens(
    loaded: LoadedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    tokens: Tensor,
    mask: Tensor,
    response_attention: Tensor,
) -> None:
    """Every token the model reads or the loss scores lies in the model's vocabulary."""
    rows = int(loaded.model.get_input_embeddings().weight.shape[0])
    label = "the built-in model" if loaded.builtin else repr(str(loaded.path))
    for what, ids, where, limit in (
        ("prompt tokens ('prompts' / 'input_ids')", prompt_ids, prompt_mask, rows),
        ("'responses'", tokens, response_attention, rows),
        ("'responses' (in the loss)", tokens, mask, loaded.vocab_size),
    ):
        used = ids[where]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= limit):
            bad = int(used.max()) if int(used.max()) >= limit else int(used.min())
            raise GradlensError(
                f"source.path: {what} has token id {bad}, outside the vocabulary [0, {limit}) "
                f"of {KEY} = {label}; the batch was tokenised for a different model"
            )


def check_layout(loaded: LoadedModel, prompt_mask: Tensor, mask: Tensor, attention: Tensor) -> None:
    """Each scored token has a real token before it, and every sequence fits the context."""
    p = prompt_mask.shape[1]
    before = attention[:, p - 1 : -1]  # [N, T]: the column whose state predicts token t
    orphan = mask & ~before
    if bool(orphan.any()):
        i, t = (int(x) for x in orphan.nonzero()[0])
        where = "its prompt ends in padding" if t == 0 else f"column {p + t - 1} is padding"
        raise GradlensError(
            f"source.path: sequence {i}: response token {t} enters the loss, but the position "
            f"before it, whose hidden state predicts it, is not a real token ({where}); prompts "
            "must be left-padded (verl's layout), with a real token before every scored one"
        )
    lengths = attention.sum(dim=-1)
    if loaded.context is not None and int(lengths.max()) > loaded.context:
        i = int(lengths.argmax())
        raise GradlensError(
            f"source.path: sequence {i} has {int(lengths[i])} prompt + response tokens, more than "
            f"the context of {KEY} ({loaded.context}, max_position_embeddings)"
        )
