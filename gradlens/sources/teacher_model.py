"""A second checkpoint as the distillation teacher of the model source (``source.teacher_path``).

The teacher reads the same sequences as the student (prompt ++ sampled completion, the same
[N, L] grid, the same positions) in one forward without autograd, in micro-batches planned for
the pass budget (`gradlens.sources.microbatch`), and gives

    h'_t = its final hidden state / T (after its final norm), W' = its lm_head (with a bias, h'
    extended by 1 and W' by the bias column, as the student's: `gradlens.sources.forward`),
    q_t = softmax(W' h'_t) = softmax(z'_t / T),

with T = ``source.temperature``, the student's sampling temperature (GKD and verl divide the
teacher's logits by the same T), and log q_t(y_t) of each sampled token (on-policy
distillation's ℓ^T, `gradlens.losses.opd`). Both forms of ``loss.distill`` read the pair.

With ``source.shared_prefix`` the teacher's forward packs each prompt's completions after one
copy of it, as the student's passes do, after its own check (a teacher may honour a 4D mask
where the student does not, or not).

The two checkpoints must share one vocabulary: the teacher's lm_head rows and its tokenizer's
size must equal the student's, or the run is refused (a teacher whose ids mean other tokens
cannot be compared entry by entry). Its logits must be W'·h' (`check_logit_path`), and its
context must hold every sequence whole (`check_teacher_context`: from its config.json before
the rollout, with the longest prompt and ``source.max_new_tokens``; again on the sequences
sampled, once it is loaded).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import LoadedModel, Sequences, Teacher
from gradlens.errors import GradlensError
from gradlens.logits import compute_logits, softmax_dtype, token_logp
from gradlens.progress import report
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import check_logit_path, final_hidden, head_weight
from gradlens.sources.microbatch import loss_tokens, plan_micro_batches, probe
from gradlens.sources.shared_prefix import with_shared_prefix

KEY = "source.teacher_path"


def check_same_vocabulary(teacher: LoadedModel, student: LoadedModel) -> None:
    """Refuse a teacher whose vocabulary is not the student's (module docstring)."""
    problems = []
    if teacher.vocab_size != student.vocab_size:
        problems.append(
            f"its lm_head has {teacher.vocab_size} rows and the student's {student.vocab_size}"
        )
    if len(teacher.tokenizer) != len(student.tokenizer):
        problems.append(
            f"its tokenizer has {len(teacher.tokenizer)} tokens and the student's "
            f"{len(student.tokenizer)}"
        )
    if not problems:
        problems += token_map_differences(teacher.tokenizer, student.tokenizer)
    if problems:
        raise GradlensError(
            f"{KEY}: {teacher.path} does not share the student's vocabulary: "
            + "; ".join(problems)
            + ". Distillation compares the two distributions entry by entry, so the teacher "
            "needs the same tokenizer vocabulary (a checkpoint of the same model family)"
        )


def token_map_differences(teacher: Any, student: Any) -> list[str]:
    """How two tokenizers of one size map tokens to other ids (empty when they agree, or when
    either cannot list its vocabulary): one special token more shifts every id after it."""
    try:
        ours, theirs = teacher.get_vocab(), student.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return []
    moved = sorted(tok for tok, i in theirs.items() if ours.get(tok) != i)
    if not moved:
        return []
    example = moved[0]
    return [
        f"its tokenizer gives {len(moved)} of the student's {len(theirs)} tokens another id "
        f"(e.g. {example!r}: {ours.get(example)} against the student's {theirs[example]})"
    ]


def check_teacher_context(context: int | None, path: str, longest: int, what: str) -> None:
    """Refuse a teacher whose context (max_position_embeddings, ``context``; None: unbounded)
    is shorter than ``longest`` positions, the length of ``what``: it reads each sequence in
    one forward, and a position past its context has no embedding (GPT-2's table) or one it was
    never trained on (rotary)."""
    if context is not None and longest > context:
        raise GradlensError(
            f"{KEY}: the context of {path} (max_position_embeddings) is {context} positions, "
            f"but {what} needs {longest}; the teacher reads each prompt and completion whole: "
            "give a teacher with a longer context, or make source.max_new_tokens or the "
            "prompts shorter"
        )


def model_teacher(
    path: str | None,
    student: LoadedModel,
    seqs: Sequences,
    tokens: Tensor,
    temperature: float,
    device: torch.device,
    dtype: torch.dtype,
    budget_bytes: int,
    shared_prefix: bool = False,
) -> tuple[Teacher, str | None]:
    """The teacher of the module docstring on the student's sequences ``seqs`` (the batch's
    [N, L − 1] grid, ``tokens`` its sampled tokens); ``path`` None is the built-in model. With
    ``shared_prefix`` the forward packs each prompt's completions after one copy of it, where
    that saves positions and the teacher passes the check of
    `gradlens.sources.shared_prefix.with_shared_prefix`; the second value is the problem that
    kept it padded, or None."""
    report("loading the teacher checkpoint", 0, 1)
    loaded = load_checkpoint(path, device, dtype, key=KEY)
    report("loading the teacher checkpoint", 1, 1)
    check_same_vocabulary(loaded, student)
    lengths = seqs.attention_mask.sum(dim=-1)  # [N] prompt + completion tokens of each
    row = int(lengths.argmax())
    check_teacher_context(
        loaded.context, str(loaded.path), int(lengths[row]), f"sequence {row} (prompt + completion)"
    )
    first = seqs.input_ids[0][seqs.attention_mask[0].bool()].tolist()
    if len(first) > 1:
        check_logit_path(loaded, first, device, key=KEY)
    problem = None
    seqs = replace(seqs, share_prefix=False)
    if shared_prefix:
        seqs, problem = with_shared_prefix(loaded.model, seqs)
    per_sequence = probe(loaded.model, seqs, temperature, loaded.bias)
    vocab = loaded.vocab_size
    plan = plan_micro_batches(loss_tokens(seqs.loss_mask), per_sequence, vocab, budget_bytes)
    parts = []
    with torch.no_grad():
        for i, rows in enumerate(plan.groups):
            report("teacher forward", i, len(plan.groups))
            parts.append(final_hidden(loaded.model, seqs.select(rows), temperature, loaded.bias))
        report("teacher forward", len(plan.groups), len(plan.groups))
        hidden = torch.cat(parts)  # [N, L − 1, H'(+1)], the groups in order
        weight = head_weight(loaded.model).detach().clone()  # [V, H'(+1)]
        logp = token_logp(compute_logits(hidden, weight), tokens)  # [N, L − 1]
    teacher = Teacher(hidden=hidden, weight=weight, sampled_logp=logp.to(softmax_dtype(dtype)))
    return teacher, problem
