"""A rollout batch dumped from a real training run (see `gradlens.batchfile` for the format).

The file gives the sampled tokens, the mask, π_old (and optionally μ_old and π_ref) and the
advantages, or rewards that ``advantage.normalization`` turns into advantages with
``source.group_size`` consecutive sequences per prompt. The lm_head analysis needs the final
hidden states and the lm_head weight: stored in the file as ``hidden_states`` and
``lm_head_weight``, or recomputed from the file's prompt and response token ids by the
checkpoint at ``source.model_path`` (gradlens.sources.recompute), which then wins over any
stored ones; with it, every loss also runs through the whole checkpoint unless
``source.whole_model`` is false (the batch then carries a `ModelContext`).

Under tensor parallelism (``SourceContext.tensor_parallel`` P > 1) the rank keeps only its rows
of the file's lm_head weight (split at load, the balanced split), or ``{rank}`` in
``source.path`` names a file per rank that holds that rank's rows (``vocab_offset``,
``vocab_size``; `gradlens.batchfile`); the batch's ``weight_rows`` says which. A checkpoint's
recomputed lm_head is whole; the compare pipeline splits it.

`dump_tensors` is the inverse: what ``gradlens dump`` writes of any source's batch. A dump of
the model source made after stale steps records them (``stale_steps``): the checkpoint cannot
reproduce the θ they reached, and a read-back with it says so in the report. A dump of a batch
from a real model records its tokenizer's vocabulary (``tokenizer_sha256``,
`gradlens.sources.tokenizer_digest`), and a read-back whose checkpoint or ``source.tokenizer``
has another vocabulary is refused: the same ids would be other tokens.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from gradlens.advantages import advantages_from_rewards
from gradlens.batchfile import TEACHER_KEYS, peek_shapes, read_batch_file, shape_keys
from gradlens.config import BatchSource
from gradlens.containers import Batch, KeptSets, Namer, Origin, Teacher, VocabRows
from gradlens.engine.vocab_split import balanced_split
from gradlens.errors import GradlensError
from gradlens.grads import effective_old_logp, softmax_view
from gradlens.logits import softmax_dtype
from gradlens.losses.distill import teacher_log_probs
from gradlens.memory import Estimate, Shape, dtype_bytes
from gradlens.sources.base import SourceContext, SourcePlan
from gradlens.sources.checkpoint import checkpoint_estimate, checkpoint_sizes, load_tokenizer
from gradlens.sources.recompute import BUILTIN, recompute_hidden
from gradlens.sources.tokenizer_digest import check_same_tokenizer, vocabulary_sha256
from gradlens.validation import teacher_tensors

JSONL_FACTOR = 4  # a .jsonl number parsed into Python objects takes about 4× its text

RANK = "{rank}"  # in source.path: this rank's own file


def rank_rows(rank: int, world: int, vocab: int) -> tuple[int, int]:
    """The rows [v0, v1) of a vocabulary of ``vocab`` rows that ``rank`` of ``world`` keeps."""
    return balanced_split(vocab, world).shard(rank)


def build_batch_file(src: BatchSource, ctx: SourceContext) -> Batch:
    """The batch stored at ``source.path``."""
    device, dtype = ctx.device, ctx.dtype
    path = Path(src.path.replace(RANK, str(ctx.rank))).expanduser()
    keep_rows = None
    if ctx.tensor_parallel > 1 and src.model_path is None:
        keep_rows = partial(rank_rows, ctx.rank, ctx.tensor_parallel)
    file = read_batch_file(path, prompts=src.model_path is not None, keep_rows=keep_rows)
    data = file.tensors
    origin = ""
    context = None
    rows = None
    tokenizer = None
    if src.model_path is not None:
        recomputed = recompute_hidden(
            src.model_path,
            data,
            path.name,
            src.temperature,
            device,
            dtype,
            whole_model_of=str(path) if src.runs_whole_model else None,
            shared_prefix=src.shared_prefix,
        )
        hidden, weight, context = recomputed.hidden, recomputed.weight, recomputed.context
        tokenizer = recomputed.tokenizer
        origin = f"; {recomputed.description}"
        stale = int(data["stale_steps"].max()) if "stale_steps" in data else 0
        if stale:
            warning = stale_note(path.name, stale)
            origin += f"; {warning}"
            if context is not None:
                context.notes.append(warning)
        if "hidden" in data:
            origin += " (the file's hidden_states and lm_head_weight are not used)"
    elif "hidden" in data:
        hidden, weight = data["hidden"], data["weight"]
        v0, v1, vocab = (int(x) for x in data["weight_rows"])
        if (v0, v1) != (0, vocab):
            rows = VocabRows(v0, v1, vocab)
            if ctx.tensor_parallel == 1:
                raise GradlensError(
                    f"source.path: {path.name} holds rows [{v0}, {v1}) of the lm_head's {vocab} "
                    "(one tensor-parallel rank's: vocab_offset, vocab_size); run it with the "
                    "other ranks' files, one per rank: torchrun --nproc-per-node P -m gradlens "
                    "compare --tensor-parallel P --set source.path=NAME{rank}.safetensors"
                )
    else:
        raise GradlensError(
            f"source.path: {path.name} has no 'hidden_states' and 'lm_head_weight'; write them "
            "into the file, or set source.model_path to a checkpoint that recomputes them from "
            "the file's token ids (docs/batchfile.md shows both)"
        )
    if src.tokenizer is not None:  # it wins over the checkpoint's
        tokenizer = load_tokenizer(src.tokenizer)
        if "tokenizer_sha256" in data:
            check_same_tokenizer(
                data["tokenizer_sha256"],
                tokenizer,
                "source.tokenizer",
                repr(src.tokenizer),
                path.name,
            )
    mask = data["mask"]
    n, t = mask.shape
    acc = softmax_dtype(dtype)
    if "advantages" in data:
        adv = data["advantages"]
        note = "read from the file"
        if "rewards" in file.keys:
            note += f" (its {file.keys['rewards']!r} not used)"
    else:
        rewards = data["rewards"]
        if rewards.dim() == 2:  # [N, T] → [N]; off the mask anything (NaN too) is padding
            rewards = torch.where(mask, rewards, 0.0).sum(-1)
        if n % src.group_size:
            raise GradlensError(
                f"source.group_size: {n} sequences are not a multiple of {src.group_size}"
            )
        adv, note = advantages_from_rewards(
            rewards, ctx.normalization, src.group_size, ctx.advantage_eps
        )
        note = f"from the file's rewards: {note}"
    advantages = (adv[:, None] if adv.dim() == 1 else adv).expand(n, t) * mask

    groups = None  # prompt groups only when stated: the default group_size 1 is no statement
    if "group_size" in src.model_fields_set:
        if n % src.group_size:
            raise GradlensError(
                f"source.group_size: {n} sequences are not a multiple of {src.group_size}"
            )
        groups = (torch.arange(n) // src.group_size).to(device)

    def opt(name: str) -> torch.Tensor | None:
        return data[name].to(acc).to(device) if name in data else None

    kept = None
    if "kept_ids" in data:
        kept = KeptSets(
            ids=data["kept_ids"].to(device),
            rule="the batch file's kept_ids",
            old_log_mass=opt("old_kept_log_mass"),
            rollout_log_mass=opt("rollout_kept_log_mass"),
        )
    teacher = file_teacher(data, device, dtype, data["tokens"], data["mask"])
    return Batch(
        hidden=hidden.to(dtype).to(device),
        weight=weight.to(dtype).to(device),
        tokens=data["tokens"].to(device),
        mask=mask.to(device),
        old_logp=data["old_logp"].to(acc).to(device),
        advantages=advantages.to(acc).to(device),
        rollout_logp=opt("rollout_logp"),
        ref_logp=opt("ref_logp"),
        groups=groups,
        source=(
            f"batch file {path.name}: {n} sequences × ≤{t} tokens, "
            f"V={weight.shape[0] if rows is None else rows.vocab}, H={weight.shape[1]}{origin}"
            + (f"; keys not read: {', '.join(file.unknown)}" if file.unknown else "")
        ),
        advantage_note=note,
        model_context=context,
        weight_rows=rows,
        kept=kept,
        tokenizer=tokenizer,
        teacher=teacher,
        origin=Origin(
            file_names(path.name, file.keys, data, src.model_path),
            frozenset() if src.model_path is None else frozenset({"hidden", "weight"}),
        ),
    )


def file_teacher(
    data: dict[str, Tensor],
    device: torch.device,
    dtype: torch.dtype,
    tokens: Tensor | None = None,
    mask: Tensor | None = None,
) -> Teacher | None:
    """The file's teacher (`gradlens.batchfile`'s ``teacher_*`` keys), if it has one: the
    hidden states, lm_head and logits in the run's dtype like the student's, the log-probs in
    its softmax dtype. Its grid is the file's response grid, which a checkpoint's recomputation
    keeps. With the sampled ``tokens`` and the ``mask`` [N, T], log q(y) (opd's) is read off
    the whole distribution where the file does not give it."""
    if not any(key in data for key in TEACHER_KEYS):
        return None
    acc = softmax_dtype(dtype)

    def get(key: str, to: torch.dtype | None) -> Tensor | None:
        x = data.get(key)
        if x is None:
            return None
        x = x.to(device)
        return x.to(to) if to is not None and x.is_floating_point() else x

    teacher = Teacher(
        hidden=get("teacher_hidden", dtype),
        weight=get("teacher_weight", dtype),
        bias=get("teacher_bias", dtype),
        logits=get("teacher_logits", dtype),
        topk_ids=get("teacher_topk_ids", None),
        topk_logp=get("teacher_topk_logp", acc),
        sampled_logp=get("teacher_logp", acc),
    )
    if tokens is None or mask is None or teacher.sampled_logp is not None:
        return teacher
    mask = mask.to(device)
    tokens = torch.where(mask, tokens.to(device), 0)  # padding may hold any id (−100)
    if readable_at(teacher, tokens):  # else validation refuses it, naming the key
        teacher = dataclasses.replace(
            teacher, sampled_logp=sampled_teacher_logp(teacher, tokens, mask, acc)
        )
    return teacher


def readable_at(teacher: Teacher, tokens: Tensor) -> bool:
    """Whether the teacher's whole distribution fits the [N, T] grid of ``tokens`` and covers
    their ids, so that log q(y) can be read off it; a teacher that does not is refused by
    `gradlens.validation.teacher_tensors` with its key."""
    grid, top = tuple(tokens.shape), int(tokens.max()) if tokens.numel() else 0
    if teacher.logits is not None:
        x = teacher.logits
        return x.dim() == 3 and tuple(x.shape[:2]) == grid and x.shape[2] > top
    if teacher.hidden is None or teacher.weight is None:
        return False
    h, w, b = teacher.hidden, teacher.weight, teacher.bias
    return (
        h.dim() == 3
        and tuple(h.shape[:2]) == grid
        and w.dim() == 2
        and w.shape[1] == h.shape[2]
        and w.shape[0] > top
        and (b is None or tuple(b.shape) == (w.shape[0],))
    )


def sampled_teacher_logp(
    teacher: Teacher, tokens: Tensor, mask: Tensor, acc: torch.dtype
) -> Tensor:
    """[N, T] log q_t(y_t) from the teacher's whole distribution (`teacher_log_probs`), one
    sequence at a time (no [M, V] beyond what the file holds); 0 off the mask."""
    out = torch.zeros(tokens.shape, dtype=acc, device=tokens.device)
    rows, cols = mask.nonzero(as_tuple=True)
    for i in range(tokens.shape[0]):
        r, c = rows[rows == i], cols[rows == i]
        logq = teacher_log_probs(teacher, r, c, acc)  # [T_i, V]
        out[r, c] = logq.gather(-1, tokens[r, c][:, None])[:, 0]
    return out


def teacher_provides(names: frozenset[str] | set[str]) -> frozenset[str]:
    """What a batch with the teacher fields ``names`` provides (`SourcePlan.provides`): any
    teacher (``teacher``), its whole distribution (``teacher_full``), log q(y)
    (``teacher_logp``)."""
    out = set()
    full = {"teacher_hidden", "teacher_weight"} <= names or "teacher_logits" in names
    if full or {"teacher_topk_ids", "teacher_topk_logp"} <= names:
        out.add("teacher")
    if full:
        out.add("teacher_full")
    if "teacher_logp" in names or full:  # log q(y) from the whole distribution
        out.add("teacher_logp")
    return frozenset(out)


def stale_note(name: str, steps: int) -> str:
    """What a file dumped after stale steps means when its checkpoint recomputes it."""
    return (
        f"{name} was dumped after {steps} stale optimizer step(s) of the model source, whose "
        "parameters θ the file does not store: source.model_path recomputes π_θ at its own "
        "parameters — at the checkpoint the dump started from (θ_old) that is the file's π_old, "
        "and every ratio is 1 up to rounding; at another checkpoint, neither θ_old nor θ"
    )


def file_names(
    file: str, keys: dict[str, str], data: dict[str, Tensor], model_path: str | None
) -> Namer:
    """Each tensor of the batch by the key the file stores it under (`Origin.name`)."""

    def name(field: str, index: tuple[int, ...]) -> str:
        where = f"source.path {file}"
        if field in ("hidden", "weight") and model_path is not None:
            what = "hidden states" if field == "hidden" else "lm_head weight"
            at = f"[{', '.join(map(str, index))}]" if index else ""
            return f"the {what}{at} recomputed by source.model_path {model_path!r}"
        stored: Tensor | None
        if field == "advantages" and "advantages" not in data:
            key, stored = keys["rewards"], data["rewards"]
            prefix = "the advantages from "
        else:
            key = keys.get(field, field)
            stored = data.get(field)
            prefix = ""
        if stored is not None and stored.dim() == 1:
            index = index[:1]  # one value per sequence, broadcast over its tokens
        at = f"[{', '.join(map(str, index))}]" if index else ""
        return f"{where}: {prefix}{key!r}{at}"

    return name


def plan_batch_file(src: BatchSource, ctx: SourceContext) -> SourcePlan:
    """The batch's sizes from the file's header (nothing read but the shapes), and the peak:
    the file's tensors as read, the hidden states and lm_head in the run's dtype, and with
    ``source.model_path`` the checkpoint's passes over prompt + response. Under tensor
    parallelism a rank reads its own file, or only its rows of a whole one: the file's size is
    then not counted, and the lm_head by the rank's share."""
    path = Path(src.path.replace(RANK, str(ctx.rank))).expanduser()
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # reading it gives the real error
    jsonl = path.suffix.lower() == ".jsonl"
    terms = [("the file's tensors, as read", size * (JSONL_FACTOR if jsonl else 1))]
    if ctx.tensor_parallel > 1:
        terms = []
    shapes = peek_shapes(path)
    if shapes is None:
        return SourcePlan(
            (Estimate("reading the batch file", "source.path", tuple(terms), True),), None, None
        )
    keys = shape_keys(shapes)
    provides: frozenset[str] = frozenset(n for n in ("rollout_logp", "ref_logp") if n in keys)
    provides |= teacher_provides(set(keys))
    grid = shapes.get(keys.get("tokens", ""), ())
    weight = shapes.get(keys.get("weight", ""), ())
    s = dtype_bytes(ctx.dtype)
    estimates = []
    shape = None
    if len(grid) == 2:
        n, t = grid
        if src.model_path is not None:
            sizes = checkpoint_sizes(None if src.model_path == BUILTIN else src.model_path)
            if sizes is not None:
                prompt = shapes.get(keys.get("prompts", ""), shapes.get("input_ids", (n, 0)))
                length = t + (prompt[1] if len(prompt) == 2 else 0)
                estimates.append(
                    checkpoint_estimate(
                        sizes, "source.path, source.model_path", ctx.dtype, n, length
                    )
                )
                shape = Shape(n, t, sizes.vocab, sizes.hidden)
        elif len(weight) == 2:
            v, h = weight
            rows = -(-v // ctx.tensor_parallel)
            terms += [("hidden states [N, T, H]", n * t * h * s), ("lm_head [V, H]", rows * h * s)]
            shape = Shape(n, t, v, h)
        for key in ("teacher_hidden", "teacher_weight", "teacher_logits"):
            stored = shapes.get(key, ())
            if stored:  # in the run's dtype, beside the file's copy
                terms.append((f"{key} in the run's dtype", math.prod(stored) * s))
    estimates.insert(0, Estimate("reading the batch file", "source.path", tuple(terms), True))
    return SourcePlan(tuple(estimates), shape, provides)


def dump_tensors(batch: Batch) -> dict[str, Tensor | None]:
    """What ``gradlens dump`` writes of a batch, under gradlens names (see `write_batch`).

    The per-token tensors of the [N, T] grid (``old_logp`` as the losses read it: π_θ itself at
    on-policy positions), the hidden states and the lm_head weight. A batch from a real model
    also carries its sequences (`ModelContext`: prompt left-padded ++ completion right-padded on
    one [N, L] grid, whose final hidden states from column ``offset`` on are the batch's grid);
    it is written in verl's layout, so that `gradlens.sources.recompute` rebuilds the same grid
    from the file and the same checkpoint: ``prompts`` [N, P] and ``attention_mask`` [N, P+T],
    and every per-token tensor cut to the T = L − P completion columns. The prompt ends where
    the loss starts: the batch's first grid column with a token in the loss (``cut``) is
    predicted from sequence column ``offset`` + ``cut`` = P − 1. The model source's grid is the
    whole sequence (offset 0, and each sequence's first completion token is in the loss); a
    batch file's grid is already the response (offset P − 1, cut 0). The columns cut off hold
    no token in the loss.
    """
    per_token: dict[str, Tensor | None] = {
        "tokens": batch.tokens,
        "mask": batch.mask.long(),  # stored as integers, as the frameworks store it
        "old_logp": effective_old_logp(batch, softmax_view(batch).logp),
        "rollout_logp": batch.rollout_logp,
        "ref_logp": batch.ref_logp,
        "advantages": batch.advantages,
        "hidden": batch.hidden,
    }
    shared: dict[str, Tensor | None] = {}
    if batch.teacher is not None:
        teacher = teacher_tensors(batch.teacher)
        shared = {k: teacher.pop(k, None) for k in ("teacher_weight", "teacher_bias")}
        per_token.update(teacher)
    if batch.kept is not None:
        per_token["kept_ids"] = batch.kept.ids
        per_token["old_kept_log_mass"] = batch.kept.old_log_mass
        per_token["rollout_kept_log_mass"] = batch.kept.rollout_log_mass
    context = batch.model_context
    if context is None:
        return {**per_token, "weight": batch.weight, **shared}
    seqs = context.sequences
    scored = batch.mask.any(dim=0).nonzero()
    cut = int(scored[0]) if scored.numel() else 0
    p = context.offset + cut + 1  # prompt columns of the [N, L] sequences
    width = seqs.input_ids.shape[1]
    if batch.mask.shape[1] - cut != width - p:
        raise AssertionError(  # the ModelContext contract: grid = sequence columns offset + 1 on
            f"batch grid of {batch.mask.shape[1]} columns beside sequences of {width} columns "
            f"from offset {context.offset}"
        )
    cropped = {k: None if x is None else x[:, cut:] for k, x in per_token.items()}
    stale = None
    if context.staleness is not None:  # θ is not the checkpoint's: say so in the file
        stale = torch.full((batch.num_sequences,), context.staleness.steps, dtype=torch.long)
    return {
        **cropped,
        "weight": batch.weight,
        **shared,
        "prompts": seqs.input_ids[:, :p],
        "attention": seqs.attention_mask.long(),  # [N, P+T]: prompt and response
        "stale_steps": stale,
        "tokenizer_sha256": vocabulary_sha256(context.loaded.tokenizer),
    }
