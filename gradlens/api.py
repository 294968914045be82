"""The Python API: diagnose the tensors of a training step, as ``gradlens compare`` would.

::

    import gradlens
    report = gradlens.diagnose(
        hidden=h,            # [N, T, H] final hidden states (after the final norm)
        weight=W,            # [V, H] lm_head weight (bias=: optional [V])
        tokens=y,            # [N, T] sampled token ids
        mask=m,              # [N, T] bool: the tokens that enter the loss
        advantages=A,        # [N] or [N, T]
        old_logp=None, rollout_logp=None, ref_logp=None,   # [N, T] each, optional
        groups=None,         # [N] prompt-group ids, optional (group-coupled losses: real)
        losses=("reinforce", "ppo", "ppo_clip", "sft"),
        loss={"eps_high": 0.28, "aggregation": "token_mean"},  # the YAML `loss` section
        diagnostics=None,    # the YAML `diagnostics` section (engine, top_k, ...)
        tokenizer=None,      # anything with decode(list[int]) -> str: the attribution's
                             # largest tokens and sequences decoded, with context
        teacher=None,        # loss.distill's teacher: {"teacher_hidden": h', "teacher_weight":
    )                        # W', ...}, the keys a batch file gives it (gradlens.batchfile)
    report.model_dump(mode="json")   # the document `gradlens compare --format json` prints
    report.metrics()                 # flat {name: float}

The tensors stay where they are (any device, any float dtype the engines accept); nothing is
copied to the CPU and no [T, V] tensor is kept beyond the engine's memory budget (the streamed
engine decides, as in ``compare``). The caller's tensors are only read: gradlens works on
detached views, never touches ``requires_grad`` or ``.grad``, and runs under ``torch.no_grad``
except for the autograd reference, which is off by default here (``diagnostics={"reference":
"autograd"}`` turns it on) and on in ``compare``. Without ``old_logp`` the batch is on-policy:
π_old := π_θ exactly (every ratio 1: ℓ_old is the ℓ the engine computes, bit for bit).

Inside a trainer whose lm_head is split by vocabulary rows over a tensor-parallel group, every
rank of the group calls ``diagnose`` with ``process_group=`` (an initialised
`torch.distributed.ProcessGroup`, e.g. the trainer's TP group), its own rows of the weight as
``weight`` [V_r, H] (and ``bias`` [V_r]) and ``vocab_rows=(v0, v1)``, the rows [v0, v1) of the
whole vocabulary they are; every other tensor is the same on every rank (the hidden states of the
same tokens, as tensor parallelism holds them). The ranks' rows must be consecutive in rank order
and cover [0, V). Every rank gets the same report, that of one process given the whole W (to
1e-12 in float64: the order of the sums over the vocabulary differs), computed by the
vocab-parallel engine (`gradlens.engine.vocab_parallel`) without W ever on one rank; the report
says so in ``engine.tensor_parallel`` and ``engine.vocab_rows``. A bad argument on one rank makes
every rank raise the same `gradlens.errors.SharedError` naming it (and the rank). Without
``old_logp`` the batch is on-policy there too.

The teacher of a distillation term (``loss={"distill": {...}}``, `gradlens.losses.distill`) is
a mapping under the names a batch file gives its tensors: ``teacher_hidden`` [N, T, H'] with
``teacher_weight`` [V, H'] (and ``teacher_bias``), or ``teacher_logits`` [N, T, V]; or the
stored top-k form ``teacher_topk_ids``/``teacher_topk_logp`` [N, T, K]; and ``teacher_logp``
[N, T] (log q(y), for ``opd``). Checked by the same rule, each problem named by its key.

Bad input raises `gradlens.GradlensError` naming the argument; the values are checked by the
rule every source's batch meets (`gradlens.validation`: token ids in the vocabulary, finite
advantages, log-probs and hidden states at the positions in the loss, log-probs ≤ 0, a finite
lm_head), each problem named with its argument and first index, ``advantages[1, 3]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradlens.compare.run import compare_batch
from gradlens.compare.tensor_parallel import VocabParallel, prepare, together
from gradlens.config import Config, validate
from gradlens.containers import (
    Batch,
    Origin,
    Teacher,
    VocabRows,
    plain_name,
    valid_index,
)
from gradlens.diagnostics.support import sampled_logp
from gradlens.engine.collectives import Collectives
from gradlens.errors import GradlensError, SharedError
from gradlens.grads import on_grid, softmax_view
from gradlens.results import CompareReport
from gradlens.sources.batch import file_teacher
from gradlens.validation import TEACHER_FIELDS, check_batch

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}
API_SOURCE = {"kind": "tensors", "description": "gradlens.diagnose(...)"}


def _tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise GradlensError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise GradlensError(f"{name}: a tensor on the meta device holds no values")
    return value.detach()


def _on_weights_device(name: str, value: Tensor, weight: Tensor) -> None:
    if value.device != weight.device:
        raise GradlensError(
            f"{name} is on {value.device} and weight on {weight.device}: use one device"
        )


def _shape(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise GradlensError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")


def _per_token(name: str, value: Any, shape: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
    """An optional [N, T] float tensor (log-probs), as the batch stores it."""
    if value is None:
        return None
    t = _tensor(name, value)
    _shape(name, t, shape)
    if not t.is_floating_point():
        raise GradlensError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.to(dtype)


def build_batch(
    hidden: Any,
    weight: Any,
    tokens: Any,
    mask: Any,
    advantages: Any,
    old_logp: Any = None,
    rollout_logp: Any = None,
    ref_logp: Any = None,
    bias: Any = None,
    groups: Any = None,
    rows: VocabRows | None = None,
    teacher: Mapping[str, Any] | None = None,
) -> Batch:
    """The `Batch` of the arguments of `diagnose`, checked; errors name the argument. ``rows``:
    the rows of the whole lm_head that ``weight`` (and ``bias``) hold under tensor parallelism."""
    h, w = _tensor("hidden", hidden), _tensor("weight", weight)
    if h.dim() != 3:
        raise GradlensError(f"hidden: expected [N, T, H], got shape {list(h.shape)}")
    if w.dim() != 2:
        raise GradlensError(f"weight: expected [V, H], got shape {list(w.shape)}")
    n, t, size = h.shape
    if w.shape[1] != size:
        raise GradlensError(
            f"weight: its hidden size {w.shape[1]} differs from hidden's {size} "
            f"(weight [V, H] = {list(w.shape)}, hidden [N, T, H] = {list(h.shape)})"
        )
    if w.dtype not in DTYPE_NAMES:
        raise GradlensError(
            f"weight: dtype {w.dtype} is not supported; use one of "
            + ", ".join(str(d).removeprefix("torch.") for d in DTYPE_NAMES)
        )
    _on_weights_device("hidden", h, w)
    if rows is not None and w.shape[0] != rows.stop - rows.start:
        raise GradlensError(
            f"weight: this rank's shard has {w.shape[0]} rows, but vocab_rows "
            f"[{rows.start}, {rows.stop}) names {rows.stop - rows.start}; pass the rows "
            f"[{rows.start}, {rows.stop}) of the [{rows.vocab}, H] lm_head weight"
        )
    if bias is not None:  # z = W h + b = [W | b]·[h; 1]
        b = _tensor("bias", bias)
        _shape("bias", b, (w.shape[0],))
        w = torch.cat([w, b.to(w.dtype)[:, None]], dim=1)
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    y = _tensor("tokens", tokens)
    _shape("tokens", y, (n, t))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise GradlensError(f"tokens: expected integer token ids, got {y.dtype}")
    m = _tensor("mask", mask)
    _shape("mask", m, (n, t))
    m = m.bool()
    if not bool(m.any()):
        raise GradlensError("mask: no token enters the loss (the mask is all False)")
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    a = _tensor("advantages", advantages)
    if tuple(a.shape) == (n,):
        a = a[:, None].expand(n, t)
    _shape("advantages", a, (n, t))
    logps = {
        name: _per_token(name, value, (n, t), acc)
        for name, value in (
            ("old_logp", old_logp),
            ("rollout_logp", rollout_logp),
            ("ref_logp", ref_logp),
        )
    }
    for name, value in {"tokens": y, "mask": m, "advantages": a, **logps}.items():
        if value is not None:
            _on_weights_device(name, value, w)
    prompt_groups = None
    if groups is not None:
        g = _tensor("groups", groups)
        _shape("groups", g, (n,))
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise GradlensError(f"groups: expected integer prompt-group ids, got {g.dtype}")
        prompt_groups = g.long().to(w.device)
    vocab = w.shape[0] if rows is None else rows.vocab  # the whole lm_head's
    batch = Batch(
        hidden=h.to(w.dtype),
        weight=w,
        tokens=y.long(),
        mask=m,
        old_logp=torch.zeros(n, t, dtype=acc, device=w.device)
        if logps["old_logp"] is None
        else logps["old_logp"],
        advantages=(a.to(acc) * m),
        rollout_logp=logps["rollout_logp"],
        ref_logp=logps["ref_logp"],
        groups=prompt_groups,
        source=f"tensors: {n} sequences × ≤{t} tokens, V={vocab}, H={w.shape[1]}",
        advantage_note="given",
        origin=Origin(argument_name),
        weight_rows=rows,
        teacher=_teacher(teacher, w.dtype, w.device, y.long(), m),
    )
    check_batch(batch)  # the rule of every source: token ids, finite values, log-probs ≤ 0
    if logps["old_logp"] is not None:
        return batch
    # on-policy: ℓ_old is the ℓ of whichever engine runs, bit for bit (``on_policy``); the stored
    # ℓ_old (what the report's batch summary reads) is the materialized log π, or under tensor
    # parallelism 0 until `_sharded_batch` fills it in (no rank holds the whole W)
    on_policy = dataclasses.replace(batch, on_policy=m.clone())
    if rows is not None:
        return on_policy
    return dataclasses.replace(on_policy, old_logp=softmax_view(batch).logp.clone())


def _teacher(
    teacher: Mapping[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device,
    tokens: torch.Tensor,
    mask: torch.Tensor,
) -> Teacher | None:
    """The ``teacher=`` mapping as a `Teacher` (the keys and dtypes of a batch file's; log q(y)
    from its whole distribution where not given, at ``tokens`` under ``mask``)."""
    if teacher is None:
        return None
    if not isinstance(teacher, Mapping):
        raise GradlensError(
            f"teacher: expected a mapping of the teacher's tensors by name, got "
            f"{type(teacher).__name__}; the names: {', '.join(TEACHER_FIELDS)}"
        )
    unknown = [k for k in teacher if k not in TEACHER_FIELDS]
    if unknown:
        raise GradlensError(
            f"teacher: unknown key(s) {', '.join(map(repr, unknown))}; the names are "
            + ", ".join(TEACHER_FIELDS)
        )
    tensors = {k: _tensor(k, v).to(device) for k, v in teacher.items() if v is not None}
    return file_teacher(tensors, device, dtype, tokens, mask) if tensors else None


def argument_name(field: str, index: tuple[int, ...]) -> str:
    """Each tensor by the argument of `diagnose` that gave it (`Origin.name`)."""
    return plain_name(field, index).removeprefix("batch.")


def api_config(
    losses: Iterable[str],
    loss: Mapping[str, Any] | None,
    diagnostics: Mapping[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device,
    ranks: int = 1,
) -> Config:
    """The run's settings, validated like a config file's (errors name ``loss.x``, ...);
    ``ranks``: the tensor-parallel group's size (``diagnostics.tensor_parallel``)."""
    for name, value in (("loss", loss), ("diagnostics", diagnostics)):
        if value is not None and not isinstance(value, Mapping):
            raise GradlensError(
                f"{name}=: a mapping of settings (e.g. {{'eps_high': 0.28}}), got "
                f"{type(value).__name__} {value!r}"
            )
    if isinstance(losses, str) or not isinstance(losses, Iterable):
        raise GradlensError(
            f"losses=: a list of loss names (e.g. ['ppo_clip']), got {type(losses).__name__} "
            f"{losses!r}"  # a string would be its letters
        )
    settings = {"reference": "none", **(diagnostics or {})}
    given = settings.setdefault("tensor_parallel", ranks)
    if given != ranks:
        raise GradlensError(
            f"diagnostics.tensor_parallel: {given}, but the process group has {ranks} ranks "
            "(process_group=); leave it out, or set it to the group's size"
        )
    return validate(
        {
            "dtype": DTYPE_NAMES[dtype],
            "device": "cuda" if device.type == "cuda" else "cpu",
            "losses": list(losses),
            "loss": dict(loss or {}),
            "diagnostics": settings,
        },
        origin="gradlens.diagnose",
    )


def diagnose(
    hidden: Any,
    weight: Any,
    tokens: Any,
    mask: Any,
    advantages: Any,
    old_logp: Any = None,
    rollout_logp: Any = None,
    ref_logp: Any = None,
    *,
    losses: Iterable[str] = ("reinforce", "ppo", "ppo_clip", "sft"),
    loss: Mapping[str, Any] | None = None,
    diagnostics: Mapping[str, Any] | None = None,
    bias: Any = None,
    tokenizer: Any = None,
    groups: Any = None,
    process_group: Any = None,
    vocab_rows: Any = None,
    teacher: Mapping[str, Any] | None = None,
) -> CompareReport:
    """Diagnose one batch of a training run (see the module docstring). ``process_group`` and
    ``vocab_rows``: the tensor-parallel group and this rank's rows [v0, v1) of the lm_head, which
    ``weight`` holds; every rank of the group calls this and gets the same report."""
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise GradlensError(
            f"tokenizer: expected an object with a decode(list[int]) -> str method (a "
            f"transformers or tokenizers tokenizer), got {type(tokenizer).__name__}"
        )

    def build(rows: VocabRows | None = None) -> Batch:
        return build_batch(
            hidden,
            weight,
            tokens,
            mask,
            advantages,
            old_logp,
            rollout_logp,
            ref_logp,
            bias,
            groups,
            rows,
            teacher,
        )

    parallel = None
    if process_group is None:
        if vocab_rows is not None:
            raise GradlensError(
                "vocab_rows: names a shard of the lm_head, which needs process_group= (the "
                "tensor-parallel group whose ranks hold the other rows); leave it out with the "
                "whole weight"
            )
        batch = build()
    else:
        device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
        batch, parallel = _sharded_batch(build, device, process_group, vocab_rows)
    batch = dataclasses.replace(batch, tokenizer=tokenizer)
    ranks = 1 if parallel is None else parallel.split.world
    device = batch.weight.device
    config = api_config(losses, loss, diagnostics, batch.weight.dtype, device, ranks)
    with torch.no_grad():
        report = compare_batch(batch, config, device, parallel)
    described = {**report.config, "source": API_SOURCE}
    return report.model_copy(update={"config": described})


def _group(process_group: Any) -> Collectives:
    """The collectives of ``process_group``: an initialised torch.distributed group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise GradlensError(
            "process_group: torch.distributed is not initialised in this process; call "
            "torch.distributed.init_process_group first (gradlens joins no group itself)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise GradlensError(
            "process_group: expected a torch.distributed.ProcessGroup (the tensor-parallel "
            f"group, e.g. dist.new_group(ranks)), got {type(process_group).__name__}"
        )
    return Collectives(process_group)


def _rows_of(vocab_rows: Any) -> tuple[int, int]:
    """(v0, v1) from ``vocab_rows``: two integers with 0 ≤ v0 < v1."""
    if vocab_rows is None:
        raise GradlensError(
            "vocab_rows: with process_group, give the rows (v0, v1) of the lm_head that this "
            "rank's weight holds, [v0, v1)"
        )
    try:
        v0, v1 = (int(x) for x in vocab_rows)
    except (TypeError, ValueError):
        raise GradlensError(
            f"vocab_rows: expected two integers (v0, v1), got {vocab_rows!r}"
        ) from None
    if not 0 <= v0 < v1:
        raise GradlensError(f"vocab_rows: expected 0 ≤ v0 < v1, got [{v0}, {v1})")
    return v0, v1


def _sharded_batch(
    build: Callable[[VocabRows], Batch], device: torch.device, process_group: Any, vocab_rows: Any
) -> tuple[Batch, VocabParallel]:
    """This rank's batch (its rows of W) and the group as the engine needs it. The ranks
    exchange their argument errors (`gradlens.compare.tensor_parallel.together`), so a bad
    argument on one rank raises the same error on every rank instead of leaving the others
    waiting; then one all_gather of the rows gives V, and `prepare` checks that the rows tile
    [0, V) and that the other tensors are the same on every rank."""
    comm = _group(process_group)
    mine = (0, 0)
    with together(comm, "arguments", device):
        mine = _rows_of(vocab_rows)
    every = comm.all_gather(torch.tensor(mine, dtype=torch.int64, device=device), "vocab")
    held = [(int(a), int(b)) for a, b in every.cpu().tolist()]  # [P] (v0, v1) in rank order
    if any(start != (held[r - 1][1] if r else 0) for r, (start, _) in enumerate(held)):
        ranks = "; ".join(f"rank {r} [{a}, {b})" for r, (a, b) in enumerate(held))
        raise SharedError(
            "vocab_rows: the ranks' rows must be consecutive in rank order from 0 (rank r's v0 "
            f"is rank r − 1's v1), covering the vocabulary [0, V); they are {ranks}"
        )
    rows = VocabRows(mine[0], mine[1], held[-1][1])
    batch, parallel = prepare(lambda: build(rows), comm, device)
    if batch.on_policy is not None:  # on-policy: the stored ℓ_old over the whole W, gathered
        r, c = valid_index(batch.mask)
        logp = sampled_logp(batch.hidden[r, c], batch.weight, batch.tokens[r, c], comm, rows.start)
        old = on_grid(logp.to(batch.old_logp.dtype), r, c, batch.mask.shape)
        batch = dataclasses.replace(batch, old_logp=old)
    return batch, parallel
