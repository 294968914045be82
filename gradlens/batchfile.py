"""Rollout batch files: read the tensors a training run dumped, write them from any source.

Formats, chosen by the file's suffix: ``.safetensors``, ``.pt`` / ``.pth`` (a ``torch.save``
of a dict of tensors), ``.jsonl`` (one JSON object per sequence, lists of numbers; for small
batches; its numbers are read as float64 and converted to the run's dtype like every file's).
Keys follow the frameworks' names (verl's, with the common alternatives):

    responses | input_ids                  [N, T] int   sampled tokens y_t
    response_mask | attention_mask         [N, T]       1 where the token enters the loss
    old_log_probs | old_log_prob           [N, T]       log π_old(y_t) (training engine)
    rollout_log_probs                      [N, T]       log μ_old(y_t) (inference engine), optional
    ref_log_prob | ref_log_probs           [N, T]       log π_ref(y_t), optional
    advantages                             [N, T] or [N]
    rewards | token_level_rewards          [N] or [N, T] (summed over T): used when there are
                                           no advantages, normalised by ``advantage.*``
    hidden_states                          [N, T, H]    the final hidden state whose logits
                                                        predict y_t (after the final norm)
    lm_head_weight                         [V, H]
    kept_ids                               [N, T, K] int  the ids of the kept set K_t that
                                                        top-p / top-k left the sampler, −1 as
                                                        padding (K: the largest |K_t|), optional
    old_log_kept_mass                      [N, T]       log S^old_t = log Σ_{v∈K_t} π_old,t,v;
                                                        absent: old_log_probs are already of π̃
    rollout_log_kept_mass                  [N, T]       log S^μ_t of the inference engine;
                                                        absent: rollout_log_probs are already
                                                        of μ̃ (an engine's processed log-probs)

A teacher for the distillation term (``loss.distill``) and on-policy distillation (``opd``),
optional; the whole distribution (both forms of ``loss.distill``) as a hidden/weight pair or as
logits, and/or the top-k form as stored ids and log-probs:

    teacher_hidden                         [N, T, H']   the teacher's final hidden states, and
    teacher_weight                         [V, H']      its lm_head (the student's vocabulary),
    teacher_bias                           [V]          and its lm_head bias, optional
    teacher_logits                         [N, T, V]    or the teacher's logits themselves
    teacher_topk_ids                       [N, T, K] int  the teacher's top-k ids, distinct
    teacher_topk_logp                      [N, T, K]    their log q_t(v) (not renormalised)
    teacher_logp                           [N, T]       log q_t(y_t) of the sampled token (opd)

Their shapes and values are checked by `gradlens.validation` like every other source's teacher.

Under tensor parallelism (``diagnostics.tensor_parallel`` P > 1) every rank reads the batch and
keeps its rows of W: a file with the whole ``lm_head_weight`` is split at load (the balanced
split of `gradlens.engine.vocab_split`; a ``.safetensors`` file is read row-wise, only the
rank's rows; ``.pt`` and ``.jsonl`` are read whole, then cut), or each rank reads a file of its
own (``{rank}`` in ``source.path``) that holds its rows only, marked by two integers:

    lm_head_weight                         [V_r, H]     rows vocab_offset … vocab_offset + V_r − 1
    vocab_offset                           int          the first row this file holds
    vocab_size                             int          V, the rows of the whole lm_head

The per-rank files hold the same tokens, hidden states and every other key (the ranks check
that they do); their rows must be consecutive in rank order and cover [0, V).

Instead of ``hidden_states`` and ``lm_head_weight``, a file may carry the prompts, and
``source.model_path`` names a checkpoint that recomputes the hidden states
(gradlens.sources.recompute). The prompt comes in verl's layout, left-padded:

    prompts                                [N, P] int   prompt token ids
    prompt_mask | attention_mask           [N, P] or [N, P+T]: 1 at real tokens (the first P
                                                        columns of ``attention_mask``)
or  input_ids + attention_mask             [N, P+T]     the whole sequence beside ``responses``;
                                                        its last T columns are the response

With ``responses`` present, an ``attention_mask`` of [N, P+T] without ``response_mask`` gives
the loss mask as its last T columns, as verl derives it.

``gradlens dump`` of a batch from a real model (the model source, or a batch file whose
hidden states a checkpoint recomputed with the whole model kept) writes this layout too:
``prompts`` [N, P] and ``attention_mask`` [N, P+T] beside the [N, T] response keys, so that the
file read back with the same checkpoint as ``source.model_path`` is the same batch
(`dump_tensors`). A dump of the model source also writes

    stale_steps                            [N] int      the optimizer steps the model source took
                                                        on the batch after π_old (its
                                                        ``source.stale.steps``)

because the checkpoint on disk holds θ_old, not the θ those steps reached: read back with it,
π_θ is π_old again (every ratio 1), and the report says so. Every dump of a batch from a real
model records the tokenizer that made its ids, one value for the whole file:

    tokenizer_sha256                       [32] uint8   the SHA-256 of the tokenizer's
                                                        vocabulary (`gradlens.sources.
                                                        tokenizer_digest`); a read-back with
                                                        another tokenizer is refused

Position t of every [N, T] tensor refers to the same response token. A dump from a training
loop is three lines (see docs/batchfile.md)::

    from safetensors.torch import save_file
    save_file({"responses": responses, "response_mask": mask, "old_log_probs": old_lp,
               "advantages": adv, "hidden_states": h, "lm_head_weight": W}, "batch.safetensors")
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.errors import GradlensError
from gradlens.files import os_reason, read_text, writing
from gradlens.memory import available, human
from gradlens.validation import describe, find, non_finite, repeated_ids

ALIASES: dict[str, tuple[str, ...]] = {
    "tokens": ("responses", "input_ids"),
    "mask": ("response_mask", "attention_mask"),
    "old_logp": ("old_log_probs", "old_log_prob"),
    "rollout_logp": ("rollout_log_probs", "rollout_log_prob"),
    "ref_logp": ("ref_log_prob", "ref_log_probs"),
    "advantages": ("advantages",),
    "rewards": ("rewards", "token_level_rewards"),
    "hidden": ("hidden_states",),
    "weight": ("lm_head_weight",),
    "prompts": ("prompts",),
    "prompt_mask": ("prompt_mask",),
    "attention": ("attention_mask",),  # [N, P+T] beside 'prompts': written by `dump_tensors`
    "stale_steps": ("stale_steps",),
    "tokenizer_sha256": ("tokenizer_sha256",),
    "kept_ids": ("kept_ids",),
    "old_kept_log_mass": ("old_log_kept_mass",),
    "rollout_kept_log_mass": ("rollout_log_kept_mass",),
    "teacher_hidden": ("teacher_hidden",),
    "teacher_weight": ("teacher_weight",),
    "teacher_bias": ("teacher_bias",),
    "teacher_logits": ("teacher_logits",),
    "teacher_topk_ids": ("teacher_topk_ids",),
    "teacher_topk_logp": ("teacher_topk_logp",),
    "teacher_logp": ("teacher_logp",),
}
TEACHER_KEYS = tuple(name for name in ALIASES if name.startswith("teacher_"))
# the keys of the batch itself: one that holds no tensor is an error, not a missing key (others,
# text prompts beside the token ids say, are left alone when they are no tensor)
TENSOR_KEYS = frozenset(
    key
    for name in ("tokens", "mask", "old_logp", "advantages", "rewards", "hidden", "weight")
    for key in ALIASES[name]
)
# one value for the whole batch, not per sequence: a .jsonl file stores them on its first line
SHARED = ("lm_head_weight", "teacher_weight", "teacher_bias", "tokenizer_sha256")
SUFFIXES = (".safetensors", ".pt", ".pth", ".jsonl")
WEIGHT_KEY = "lm_head_weight"
SHARD_KEYS = ("vocab_offset", "vocab_size")  # a file holding some rows of W (one rank's)
# every key gradlens reads; a trainer's dump holds others (values, returns, uid, ...): named in
# the report as not read, so that a misspelt key is seen
KNOWN_KEYS = frozenset({*(key for aliases in ALIASES.values() for key in aliases), *SHARD_KEYS})
LEFT_PADDED = ("prompts", "prompt_mask")  # verl left-pads prompts; .jsonl lines are unpadded
WHOLE_SEQUENCE = ("input_ids", "attention_mask")  # [P+T] beside 'responses'
# the .jsonl keys with one entry per response token of a line (a list when given per token)
PER_TOKEN_NAMES = (
    "mask", "old_logp", "rollout_logp", "ref_logp", "advantages", "rewards", "hidden", "kept_ids",
    "old_kept_log_mass", "rollout_kept_log_mass", "teacher_hidden", "teacher_logits",
    "teacher_topk_ids", "teacher_topk_logp", "teacher_logp",
)  # fmt: skip
RESPONSE_ALIGNED = frozenset(
    key for name in PER_TOKEN_NAMES for key in ALIASES[name] if key not in WHOLE_SEQUENCE
)
DIGEST = "a SHA-256 digest is 32 bytes, whole numbers from 0 to 255"
LOSS = "0 (not in the loss) or 1 (in the loss)"  # what a response mask holds
ATTENTION = "0 (padding) or 1 (a real token)"  # what an attention or prompt mask holds
# V → (v0, v1): the rows of the lm_head weight a tensor-parallel rank keeps
RowChooser = Callable[[int], tuple[int, int]]


def _load_raw(
    path: Path, where: str, keep_rows: RowChooser | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """(the file's tensors by key, the keys of its other values that gradlens does not read)."""
    others: list[str] = []
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise GradlensError(f"{where}: no such file: {str(path)!r}") from None
    except OSError as exc:  # a name too long, a loop of links
        raise GradlensError(f"{where}: {str(path)!r}: {os_reason(exc)}") from None
    if stat.S_ISDIR(mode):
        raise GradlensError(f"{where}: {str(path)!r} is a directory, not a batch file")
    if not stat.S_ISREG(mode):
        raise GradlensError(f"{where}: {str(path)!r} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise GradlensError(f"{where}: unknown format {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            return _load_safetensors(path, keep_rows), others
        if suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, Mapping):
                raise GradlensError(
                    f"{where}: {path.name} holds a {type(data).__name__}, not a dict"
                )
            raw = {}
            for k, v in data.items():
                key = str(k)
                if isinstance(v, int) and not isinstance(v, bool) and key in SHARD_KEYS:
                    v = torch.tensor(v)  # one number, as a script naturally writes it
                if isinstance(v, Tensor):
                    raw[key] = v
                elif key in KNOWN_KEYS and key != "prompts":  # text prompts beside the ids
                    raise GradlensError(
                        f"{where}: {key!r} in {path.name} holds a {type(v).__name__}, not a "
                        "tensor; every key gradlens reads is a tensor (torch.save a dict of "
                        "tensors)"
                    )
                elif key not in KNOWN_KEYS:
                    others.append(key)
        else:
            raw = _load_jsonl(path, where)
        _dense_real(raw, where, path.name)
        return _keep_rows(raw, keep_rows), others
    except GradlensError:
        raise
    except Exception as exc:  # a corrupt or foreign file: the first line of what was wrong
        raise GradlensError(f"{where}: cannot read {path.name}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """Why a file could not be read, in one line."""
    text = str(exc).strip()
    if "Weights only load failed" in text:  # torch.load(weights_only=True)'s long advice
        return (
            "torch.load (weights_only=True) refused it: not a torch.save file of tensors (a "
            "pickled object, or another format)"
        )
    if not text:  # EOFError from an empty or truncated pickle, among others
        return f"{type(exc).__name__}: the file is empty or cut short"
    return text.splitlines()[0]


def _dense_real(raw: Mapping[str, Tensor], where: str, name: str) -> None:
    """Every tensor a dense array of real numbers with its data in memory: a sparse or meta
    tensor (a .pt file can hold either) or complex numbers are refused, naming the key."""
    for key, x in raw.items():
        if x.layout != torch.strided:
            raise GradlensError(
                f"{where}: {key!r} in {name} is a {str(x.layout).removeprefix('torch.')} "
                "tensor; batch tensors are dense (torch.strided)"
            )
        if x.is_meta:
            raise GradlensError(
                f"{where}: {key!r} in {name} is on the meta device and holds no values"
            )
        if x.is_complex():
            raise GradlensError(
                f"{where}: {key!r} in {name} has the complex dtype "
                f"{str(x.dtype).removeprefix('torch.')}; batch values are real numbers"
            )


def peek_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The shape of every tensor in the file by its key, without reading the data: the header
    of a .safetensors file, a memory-mapped .pt; None for a .jsonl file (only parsing tells)
    or a file that cannot be read that way (reading it then gives the real error)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        if suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(data, Mapping):
                return {str(k): tuple(v.shape) for k, v in data.items() if isinstance(v, Tensor)}
    except Exception:  # a corrupt or foreign file: `read_batch_file` says what is wrong
        return None
    return None


def peek_tokenizer_sha256(path: Path, where: str = "source.path") -> Tensor | None:
    """The file's ``tokenizer_sha256`` ([32] uint8) without reading its other tensors (a
    .jsonl file: its first line, which holds the batch's shared values); None when it has none
    or cannot be read that way (reading it whole then gives the real error)."""
    key = "tokenizer_sha256"
    suffix = path.suffix.lower()
    value: Any = None
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                value = fh.get_tensor(key) if key in fh.keys() else None  # noqa: SIM118
        elif suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            value = data.get(key) if isinstance(data, Mapping) else None
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), "{}")
            row = json.loads(first)
            value = torch.tensor(row[key]) if isinstance(row, dict) and key in row else None
    except Exception:  # a corrupt or foreign file: `read_batch_file` says what is wrong
        return None
    return None if not isinstance(value, Tensor) else _digest(value, where)


def shape_keys(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """gradlens name → the key the file uses for it, for the keys present."""
    return {name: key for name in ALIASES if (key := _key(shapes, name)) is not None}


def _load_safetensors(path: Path, keep_rows: RowChooser | None) -> dict[str, Tensor]:
    """Every tensor of the file; with ``keep_rows`` only those rows of the whole lm_head weight
    are read (and the shard keys added)."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        split = keep_rows is not None and WEIGHT_KEY in keys and SHARD_KEYS[0] not in keys
        for key in keys:
            if split and key == WEIGHT_KEY:
                assert keep_rows is not None
                rows = fh.get_slice(key)
                vocab = int(rows.get_shape()[0])
                v0, v1 = keep_rows(vocab)
                out[key] = rows[v0:v1]
                out.update(_shard_keys(v0, vocab))
            else:
                out[key] = fh.get_tensor(key)
    return out


def _keep_rows(raw: dict[str, Tensor], keep_rows: RowChooser | None) -> dict[str, Tensor]:
    """``raw`` with only the chosen rows of a whole lm_head weight (and the shard keys)."""
    weight = raw.get(WEIGHT_KEY)
    if keep_rows is None or weight is None or SHARD_KEYS[0] in raw or weight.dim() < 1:
        return raw
    vocab = int(weight.shape[0])
    v0, v1 = keep_rows(vocab)
    return {**raw, WEIGHT_KEY: weight[v0:v1].clone(), **_shard_keys(v0, vocab)}


def _shard_keys(offset: int, vocab: int) -> dict[str, Tensor]:
    return {SHARD_KEYS[0]: torch.tensor(offset), SHARD_KEYS[1]: torch.tensor(vocab)}


def _shard_number(raw: Mapping[str, Tensor], key: str, where: str) -> int:
    """A shard key's integer: one number, or (a .jsonl file) the same number on every line."""
    x = raw[key].reshape(-1)  # .jsonl numbers are read as float64: whole ones are integers
    if x.numel() == 0 or bool((x != torch.round(x)).any()) or bool((x != x[0]).any()):
        raise GradlensError(
            f"{where}: {key!r} must be one integer (the same on every line of a .jsonl file); "
            f"got {raw[key].tolist()}"
        )
    return int(x[0])


def weight_rows(raw: Mapping[str, Tensor], rows: int, where: str) -> tuple[int, int, int]:
    """(v0, v1, V): the rows of the whole lm_head that a file's ``lm_head_weight`` of ``rows``
    rows holds: all of them, or those its shard keys name."""
    present = [k for k in SHARD_KEYS if k in raw]
    if not present:
        return 0, rows, rows
    if len(present) == 1:
        missing = next(k for k in SHARD_KEYS if k not in raw)
        raise GradlensError(
            f"{where}: {present[0]!r} without {missing!r}; a file holding some rows of the "
            f"lm_head names both (the first row it holds and the rows of the whole lm_head)"
        )
    offset, vocab = (_shard_number(raw, k, where) for k in SHARD_KEYS)
    if offset < 0 or offset + rows > vocab:
        raise GradlensError(
            f"{where}: 'lm_head_weight' holds {rows} rows from vocab_offset {offset}, outside "
            f"the vocabulary [0, {vocab}) of vocab_size"
        )
    return offset, offset + rows, vocab


JSONL_PARSE_FACTOR = 4
"""Host memory to parse a ``.jsonl`` batch, in multiples of the file's size: its text, then
Python's numbers and lists, then the tensors. Measured: 3.0× for a dump of 64 sequences of 512
tokens with 8-wide hidden states (7.2 MB of text, 21.5 MB more resident memory)."""


def _jsonl_limit() -> tuple[int, str] | None:
    """`read_text`'s limit for a .jsonl batch: what the host memory can parse."""
    room = available(torch.device("cpu"))
    if room is None:
        return None
    return room[0] // JSONL_PARSE_FACTOR, (
        f"parsing JSON takes about {JSONL_PARSE_FACTOR}× the text's size, and this machine "
        f"has {human(room[0])} available; write the batch as .pt or .safetensors, which are "
        "read without parsing"
    )


MASK_KEYS = frozenset((*ALIASES["mask"], *ALIASES["prompt_mask"], *ALIASES["attention"]))
"""The keys that may hold booleans (true: a real, counted token)."""
# what the other keys hold instead, where a boolean would be most misleading
INTEGER_KEYS = {
    **dict.fromkeys(
        (*ALIASES["tokens"], *ALIASES["kept_ids"], *ALIASES["teacher_topk_ids"], "prompts"),
        "token ids are integers",
    ),
    **dict.fromkeys(SHARD_KEYS, "a shard key is one integer, a row number"),
    "stale_steps": "step counts are whole numbers",
    "tokenizer_sha256": DIGEST,
}


def _no_boolean_values(raw: Mapping[str, Tensor], where: str) -> None:
    """A boolean tensor is a mask or nothing: read as numbers, False and True would become the
    log-probs 0 and 1, advantages of 0 and 1, ids 0 and 1. Every key the file's readers take
    is checked here, once."""
    for key, x in raw.items():
        if x.dtype == torch.bool and key in KNOWN_KEYS and key not in MASK_KEYS:
            what = INTEGER_KEYS.get(key, f"{key!r} takes numbers")
            raise GradlensError(
                f"{where}: {key!r} holds booleans; {what}, and only the masks "
                f"({', '.join(sorted(MASK_KEYS))}) take booleans"
            )


def _boolean_at(value: Any) -> tuple[list[int], bool] | None:
    """(the index of the first JSON boolean in a nested list, the boolean), or None: true
    would become the number 1 in a tensor, an id or a value the file never meant."""
    if isinstance(value, bool):
        return [], value
    if isinstance(value, list):
        for i, entry in enumerate(value):
            inner = _boolean_at(entry)
            if inner is not None:
                return [i, *inner[0]], inner[1]
    return None


def _no_booleans(row: Mapping[str, Any], line: int, where: str, name: str) -> None:
    for key, value in row.items():
        found = None if key in MASK_KEYS else _boolean_at(value)
        if found is not None:
            index = "".join(f"[{i}]" for i in found[0])
            raise GradlensError(
                f"{where}: line {line} of {name}: {key!r}{index} is the boolean "
                f"{json.dumps(found[1])}; only the masks ({', '.join(sorted(MASK_KEYS))}) take "
                "booleans, every other key numbers"
            )


class _RepeatedKey(Exception):
    """A key given twice in one JSON object (`_unique_keys`)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s object hook: the object, or `_RepeatedKey` for a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _load_jsonl(path: Path, where: str) -> dict[str, Tensor]:
    rows = []
    for i, line in enumerate(read_text(path, where, _jsonl_limit()).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line, object_pairs_hook=_unique_keys))
            except json.JSONDecodeError as exc:
                raise GradlensError(
                    f"{where}: line {i} of {path.name} is not JSON: {exc}"
                ) from None
            except _RepeatedKey as exc:
                raise GradlensError(
                    f"{where}: line {i} of {path.name} gives the key {exc.args[0]!r} twice; "
                    "JSON would keep the last silently"
                ) from None
            if not isinstance(rows[-1], dict):
                raise GradlensError(
                    f"{where}: line {i} of {path.name} is a JSON {type(rows[-1]).__name__}; "
                    "each line is one sequence, an object of its keys"
                )
            if "true" in line or "false" in line:  # only then can the line hold a boolean
                _no_booleans(rows[-1], i, where, path.name)
    if not rows:
        raise GradlensError(f"{where}: {path.name} is empty")
    first = set(rows[0])
    for i, r in enumerate(rows[1:], start=2):
        later = sorted(set(r) - first)
        shared = [k for k in r if k in SHARED]
        if later or shared:
            key = (shared or later)[0]
            rule = (
                "it is one value for the whole batch, given on line 1 alone"
                if shared
                else "every key of the batch is on line 1, and then on every line"
            )
            raise GradlensError(f"{where}: line {i} of {path.name} gives {key!r}: {rule}")
    if "prompts" in rows[0] and "prompt_mask" not in rows[0]:  # unpadded: every token is real
        for r in rows:
            if isinstance(r.get("prompts"), list):
                r["prompt_mask"] = [1] * len(r["prompts"])
    out: dict[str, Tensor] = {}
    for key in rows[0]:
        if key in SHARED:
            out[key] = torch.tensor(rows[0][key], dtype=torch.float64)
            continue
        values = [r.get(key) for r in rows]
        if any(v is None for v in values):
            raise GradlensError(f"{where}: key {key!r} is missing from some lines of {path.name}")
        if key in RESPONSE_ALIGNED:
            _same_lengths(rows, key, where, path.name)
        try:
            if key in WHOLE_SEQUENCE and "responses" in rows[0]:
                out[key] = _pad_whole_sequence(values, [r.get("responses") for r in rows], key)
            else:
                out[key] = _pad(values, key, left=key in LEFT_PADDED)
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise GradlensError(
                f"{where}: {key!r} in {path.name}: {exc}; each line's value must be a number, "
                "or a list (of lists) of numbers of one shape on every line"
            ) from None
    return out


def _same_lengths(rows: list[dict[str, Any]], key: str, where: str, name: str) -> None:
    """A per-token key of a .jsonl line (a list, or a number per sequence for the advantages
    and rewards) has one entry per response token of its line: padding it would put made-up
    values at positions in the loss."""
    tokens_key = next((k for k in ALIASES["tokens"] if k in rows[0]), None)
    if tokens_key is None or key == tokens_key:
        return
    for i, r in enumerate(rows, start=1):
        value, tokens = r.get(key), r.get(tokens_key)
        if isinstance(value, list) and isinstance(tokens, list) and len(value) != len(tokens):
            raise GradlensError(
                f"{where}: line {i} of {name}: {key!r} has {len(value)} entries and "
                f"{tokens_key!r} {len(tokens)}; a per-token key has one entry per response token"
            )


def _pad(values: list, key: str, left: bool = False) -> Tensor:
    """Per-sequence lists of ragged length → a right- (or left-) padded [N, T(, H)] tensor; the
    entries of every line have one shape (a hidden state of H numbers on every line)."""
    first = torch.tensor(values[0])
    if first.dim() == 0:
        return torch.tensor(values, dtype=torch.float64)
    # JSON numbers are doubles; token ids and masks too, checked for whole numbers (and 0/1)
    # when they are read, never truncated here
    dtype = torch.float64
    inner = tuple(first.shape[1:])
    rows = []
    for i, v in enumerate(values, start=1):
        if not isinstance(v, list):
            raise ValueError(f"line {i} holds a {type(v).__name__}, line 1 a list")
        row = torch.tensor(v, dtype=dtype)
        if len(v) and tuple(row.shape[1:]) != inner:
            raise ValueError(
                f"line {i} has entries of shape {tuple(row.shape[1:])}, line 1 of shape {inner}"
            )
        rows.append(row)
    length = max(len(row) for row in rows)
    out = torch.zeros((len(rows), length, *inner), dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, length - len(row) :] = row
            else:
                out[i, : len(row)] = row
    return out


def _pad_whole_sequence(values: list, responses: list, key: str) -> Tensor:
    """Unpadded prompt + response lines → verl's [N, P+T] layout: each line split where its
    response starts, the prompt part left-padded to P and the response part right-padded to T."""
    if not all(
        isinstance(v, list) and isinstance(r, list) for v, r in zip(values, responses, strict=True)
    ):
        return _pad(values, key)
    cuts = [max(len(v) - len(r), 0) for v, r in zip(values, responses, strict=True)]
    if not any(cuts):  # as long as the responses: the [T] alias of the response keys
        return _pad(values, key)
    head = _pad([v[:c] for v, c in zip(values, cuts, strict=True)], key, left=True)
    tail = _pad([v[c:] for v, c in zip(values, cuts, strict=True)], key)
    return torch.cat([head, tail], dim=1)


def _key(raw: Mapping[str, Any], name: str) -> str | None:
    """The first of the name's aliases that the file has."""
    return next((key for key in ALIASES[name] if key in raw), None)


def _pick(raw: Mapping[str, Tensor], name: str, where: str, required: bool) -> Tensor | None:
    key = _key(raw, name)
    if key is not None:
        return raw[key]
    if required:
        raise GradlensError(
            f"{where}: the batch has no {' / '.join(repr(k) for k in ALIASES[name])}; "
            f"keys present: {', '.join(sorted(raw)) or '(none)'}"
        )
    return None


@dataclass(frozen=True)
class BatchFile:
    """A batch file's tensors under gradlens names, and the key each was read from.

    ``keys`` maps a gradlens name (``tokens``, ``mask``, ``old_logp``, ...) to the key the file
    uses for it (``responses``, ``response_mask``, ``old_log_probs``, ...), for messages.
    """

    tensors: dict[str, Tensor]
    keys: dict[str, str]
    unknown: tuple[str, ...] = ()  # keys of the file that gradlens does not read, sorted


def read_batch_tensors(
    path: Path,
    where: str = "source.path",
    prompts: bool = False,
    keep_rows: RowChooser | None = None,
) -> dict[str, Tensor]:
    """The file's tensors under gradlens names (`read_batch_file` without the keys)."""
    return read_batch_file(path, where, prompts, keep_rows).tensors


def read_batch_file(
    path: Path,
    where: str = "source.path",
    prompts: bool = False,
    keep_rows: RowChooser | None = None,
) -> BatchFile:
    """The file's tensors under gradlens names, shapes checked; every error names the key.

    Checked here: the keys and their shapes, and what only the file shows: token ids and masks
    stored as floats must hold integers (0 or 1 for a mask), rewards must be finite. The values
    of the batch itself (finite log-probs ≤ 0, token ids in the vocabulary, ...) are checked by
    `gradlens.validation` for every source alike.

    ``prompts``: also the prompt tokens that recompute the hidden states (``source.model_path``):
    ``prompt_ids`` [N, P], ``prompt_mask`` [N, P] and ``response_attention`` [N, T].
    ``keep_rows``: keep only these rows of a whole ``lm_head_weight`` (a tensor-parallel rank's).
    With the lm_head, ``weight_rows`` is the int64 [3] (v0, v1, V): ``weight`` holds rows
    [v0, v1) of V (all of them unless the file is one rank's or ``keep_rows`` chose).
    """
    raw, others = _load_raw(path, where, keep_rows)
    _no_boolean_values(raw, where)
    out: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    tokens_key = _key(raw, "tokens")
    tokens = _pick(raw, "tokens", where, True)
    assert tokens is not None and tokens_key is not None
    keys["tokens"] = tokens_key
    if tokens.dim() != 2:
        raise GradlensError(
            f"{where}: {tokens_key!r} must be [N, T]; got shape {tuple(tokens.shape)}"
        )
    n, t = tokens.shape
    if n == 0 or t == 0:
        raise GradlensError(
            f"{where}: {tokens_key!r} has shape {tuple(tokens.shape)}; a batch needs at least "
            "one sequence of at least one token"
        )
    for name in ("mask", "old_logp", "rollout_logp", "ref_logp"):
        key = _key(raw, name)
        x = _pick(raw, name, where, required=name in ("mask", "old_logp"))
        if x is None or key is None:
            continue
        keys[name] = key
        if (
            key == "attention_mask"
            and tokens_key == "responses"
            and x.dim() == 2
            and x.shape[0] == n
            and x.shape[1] > t
        ):
            # verl: the response mask is the last T columns of [N, P+T]; 0/1 everywhere
            x = _mask(x, key, where, ATTENTION)[:, -t:]
        if tuple(x.shape) != (n, t):
            raise GradlensError(
                f"{where}: {key!r} has shape {tuple(x.shape)}; expected [N, T] = "
                f"{(n, t)} like {tokens_key!r}"
            )
        if name == "mask":
            out[name] = _mask(x, key, where, ATTENTION if key == "attention_mask" else LOSS)
        else:
            out[name] = x.double()
    out["tokens"] = _integers(tokens, tokens_key, where, out["mask"])
    out.update(_kept_sets(raw, out["mask"], where, out["tokens"], tokens_key))
    adv, rewards = _pick(raw, "advantages", where, False), _pick(raw, "rewards", where, False)
    if adv is None and rewards is None:
        raise GradlensError(
            f"{where}: the batch needs 'advantages' or 'rewards'; keys present: "
            f"{', '.join(sorted(raw))}"
        )
    for name, x in (("advantages", adv), ("rewards", rewards)):
        key = _key(raw, name)
        if x is None or key is None:
            continue
        keys[name] = key
        if tuple(x.shape) not in ((n,), (n, t)):
            raise GradlensError(
                f"{where}: {key!r} has shape {tuple(x.shape)}; expected [N] or [N, T]"
            )
        if not (x.is_floating_point() or x.dtype.is_signed):  # uint8: no negative numbers
            x = x.long()
        out[name] = x.double()
    if "rewards" in out and "advantages" not in out:
        r = out["rewards"]
        found = find(r, non_finite, out["mask"] if r.dim() == 2 else None)
        if found is not None:
            index = ", ".join(map(str, found.index))
            raise GradlensError(
                f"{where}: {keys['rewards']!r}[{index}] is {describe(found.value)}; every "
                f"reward must be a finite number ({found.count} such entries in all)"
            )
    hidden, weight = _pick(raw, "hidden", where, False), _pick(raw, "weight", where, False)
    if (hidden is None) != (weight is None):
        missing = "lm_head_weight" if weight is None else "hidden_states"
        raise GradlensError(
            f"{where}: {missing!r} is missing; an lm_head analysis needs both "
            "'hidden_states' and 'lm_head_weight'"
        )
    if hidden is not None and weight is not None:
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (n, t):
            raise GradlensError(
                f"{where}: 'hidden_states' has shape {tuple(hidden.shape)}; "
                f"expected [N, T, H] with [N, T] = {(n, t)}"
            )
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise GradlensError(
                f"{where}: 'lm_head_weight' has shape {tuple(weight.shape)}; "
                f"expected [V, H] with H = {hidden.shape[2]}"
            )
        if hidden.shape[2] == 0:
            raise GradlensError(
                f"{where}: 'hidden_states' has shape {tuple(hidden.shape)}; the hidden size H "
                "must be at least 1"
            )
        for key, x in (("hidden_states", hidden), ("lm_head_weight", weight)):
            if not x.is_floating_point():
                raise GradlensError(
                    f"{where}: {key!r} has dtype {str(x.dtype).removeprefix('torch.')}; "
                    "expected floating-point numbers"
                )
        out["hidden"], out["weight"] = hidden, weight
        keys["hidden"], keys["weight"] = "hidden_states", "lm_head_weight"
        v0, v1, v = weight_rows(raw, int(weight.shape[0]), where)
        if v < 2:
            raise GradlensError(
                f"{where}: 'lm_head_weight' has a vocabulary of {v} row(s); a softmax over "
                "fewer than 2 tokens is constant, so no loss has a gradient to diagnose"
            )
        out["weight_rows"] = torch.tensor([v0, v1, v])
        kept_used = out["kept_ids"][out["mask"]] if "kept_ids" in out else tokens[:0]
        if kept_used.numel() and int(kept_used.max()) >= v:
            raise GradlensError(
                f"{where}: 'kept_ids' has ids outside the vocabulary [0, {v}) of 'lm_head_weight'"
            )
    stale = _pick(raw, "stale_steps", where, False)
    if stale is not None:
        if tuple(stale.shape) != (n,):
            raise GradlensError(
                f"{where}: 'stale_steps' has shape {tuple(stale.shape)}; expected [N] = ({n},)"
            )
        steps = _integers(stale, "stale_steps", where, what="step counts are whole numbers")
        if bool((steps < 0).any()):
            row = int((steps < 0).nonzero()[0])
            raise GradlensError(
                f"{where}: 'stale_steps'[{row}] is {int(steps[row])}; a number of optimizer "
                "steps is ≥ 0"
            )
        out["stale_steps"] = steps
    digest = _pick(raw, "tokenizer_sha256", where, False)
    if digest is not None:
        out["tokenizer_sha256"] = _digest(digest, where)
    out.update(_teacher(raw, (n, t), out["mask"], where))
    keys.update({name: name for name in TEACHER_KEYS if name in out})
    if prompts:
        out.update(_prompt_context(raw, tokens_key, out["tokens"], out["mask"], where))
    unknown = sorted({*others, *(k for k in raw if k not in KNOWN_KEYS)})
    return BatchFile(out, keys, tuple(unknown))


def _digest(x: Tensor, where: str) -> Tensor:
    """The 32 bytes of ``tokenizer_sha256`` as uint8 (any integer dtype, or whole floats)."""
    if tuple(x.shape) != (32,):
        raise GradlensError(
            f"{where}: 'tokenizer_sha256' has shape {tuple(x.shape)}; expected [32], {DIGEST}"
        )
    values = _integers(x, "tokenizer_sha256", where, what=DIGEST)
    outside = ((values < 0) | (values > 255)).nonzero()
    if outside.numel():
        i = int(outside[0])
        raise GradlensError(f"{where}: 'tokenizer_sha256'[{i}] is {int(values[i])}; {DIGEST}")
    return values.to(torch.uint8)


def _teacher(
    raw: Mapping[str, Tensor], grid: tuple[int, int], mask: Tensor, where: str
) -> dict[str, Tensor]:
    """The teacher's keys as stored; only what the file format decides is settled here: top-k
    ids stored as floats (a .jsonl file) must be whole numbers at the tokens in the loss, and
    the log-probs are read in float64. Shapes and values are `gradlens.validation`'s."""
    out = {}
    for key in TEACHER_KEYS:
        x = raw.get(key)
        if x is None:
            continue
        if key == "teacher_topk_ids" and x.is_floating_point():
            if x.dim() == 3 and tuple(x.shape[:2]) == grid:  # else: the shape check names it
                x = _integers(x, key, where, mask[..., None].expand_as(x))
        elif key in ("teacher_topk_logp", "teacher_logp") and x.is_floating_point():
            x = x.double()
        out[key] = x
    return out


def _integers(
    x: Tensor,
    key: str,
    where: str,
    valid: Tensor | None = None,
    what: str = "token ids are integers",
) -> Tensor:
    """Token ids (or other counts, ``what`` they are) as int64; stored as floats they must be
    whole numbers (at ``valid`` positions: padding may hold anything), never silently
    truncated (booleans: refused by `_no_boolean_values`)."""
    if x.is_floating_point():
        # NaN ≠ NaN: caught too; beyond int64 no id either
        found = find(x, lambda v: (v != torch.round(v)) | (v.abs() > 2.0**62), valid)
        if found is not None:
            index = ", ".join(map(str, found.index))
            raise GradlensError(
                f"{where}: {key!r}[{index}] is {describe(found.value)}, not a whole number "
                f"that fits in int64; {what} ({found.count} such entries in all)"
            )
        if valid is not None:
            x = torch.where(valid, x, 0.0)  # padding that is no id at all: never read
    return x.long()


def _mask(x: Tensor, key: str, where: str, meaning: str = LOSS) -> Tensor:
    """A mask as bool; stored as numbers it must hold 0 and 1 only (``meaning`` says what each
    is in this mask)."""
    if x.dtype != torch.bool:
        found = find(x, lambda v: (v != 0) & (v != 1))
        if found is not None:
            index = ", ".join(map(str, found.index))
            raise GradlensError(
                f"{where}: {key!r}[{index}] is {describe(found.value)}; a mask holds {meaning} "
                f"({found.count} such entries in all)"
            )
    return x.bool()


def _kept_sets(
    raw: Mapping[str, Tensor], mask: Tensor, where: str, tokens: Tensor, tokens_key: str
) -> dict[str, Tensor]:
    """The optional kept sets: ``kept_ids`` [N, T, K] (ids ≥ −1, none twice at a position in the
    loss, each holding its sampled token: the sampler drew from it, whether or not the run
    replays it) and the log kept masses [N, T], which come only with them: at the positions in the
    loss (``mask``) each is the log of a probability mass, finite and ≤ 0 up to the rounding of
    a sum of |K_t| probabilities, log(1 + |K_t|·ε) for the file's dtype (each term rounded by a
    relative ε at most, summed in any order)."""
    grid = tuple(mask.shape)
    ids = raw.get("kept_ids")
    masses = {
        name: raw.get(ALIASES[name][0]) for name in ("old_kept_log_mass", "rollout_kept_log_mass")
    }
    if ids is None:
        given = [ALIASES[name][0] for name, x in masses.items() if x is not None]
        if given:
            raise GradlensError(
                f"{where}: {', '.join(repr(k) for k in given)} given without 'kept_ids' "
                "[N, T, K], the kept sets they are the masses of"
            )
        return {}
    if ids.dim() != 3 or tuple(ids.shape[:2]) != grid or ids.shape[2] == 0:
        raise GradlensError(
            f"{where}: 'kept_ids' has shape {tuple(ids.shape)}; expected [N, T, K] with [N, T] = "
            f"{grid} and K ≥ 1 (the ids of each kept set, −1 as padding)"
        )
    ids = _integers(ids, "kept_ids", where)  # a .jsonl file stores them as whole doubles
    if int(ids.min()) < -1:
        raise GradlensError(
            f"{where}: 'kept_ids' must be token ids ≥ 0, with −1 as padding; found {int(ids.min())}"
        )
    found = find(ids, lambda k: repeated_ids(k) & (k >= 0), mask)
    if found is not None:
        index = ", ".join(map(str, found.index))
        raise GradlensError(
            f"{where}: 'kept_ids'[{index}] is {int(found.value)}, an id already in the kept set "
            f"of its position; a kept set lists each token once ({found.count} repeats in all)"
        )
    outside = mask & ~(ids == tokens[..., None]).any(-1)  # [N, T]
    if bool(outside.any()):
        i, t = (int(x) for x in outside.nonzero()[0])
        raise GradlensError(
            f"{where}: {tokens_key!r}[{i}, {t}] is {int(tokens[i, t])}, not in its kept set "
            f"'kept_ids'[{i}, {t}] = {[k for k in ids[i, t].tolist() if k >= 0]}: the sampler "
            f"draws from the kept set, so these kept ids are not this batch's "
            f"({int(outside.sum())} such tokens in all)"
        )
    out = {"kept_ids": ids}
    sizes = (ids >= 0).sum(dim=-1)  # [N, T] |K_t|
    for name, x in masses.items():
        if x is None:
            continue
        key = ALIASES[name][0]
        if tuple(x.shape) != grid:
            raise GradlensError(
                f"{where}: {key!r} has shape {tuple(x.shape)}; expected [N, T] = {grid}"
            )
        if not x.is_floating_point():
            raise GradlensError(
                f"{where}: {key!r} has dtype {str(x.dtype).removeprefix('torch.')}; expected "
                "floating-point numbers"
            )
        slack = torch.log1p(sizes.double() * torch.finfo(x.dtype).eps)
        value = x.double()
        found = find(value - slack, lambda v: ~(v <= 0) | torch.isinf(v), mask)
        if found is not None:
            row, col = found.index
            raise GradlensError(
                f"{where}: {key!r}[{row}, {col}] is {describe(float(value[row, col]))}; a log "
                "kept mass is the log of a probability mass: finite and ≤ 0 (up to "
                f"{float(slack[row, col]):.2g} of rounding) ({found.count} such entries in all)"
            )
        out[name] = value
    return out


def _prompt_context(
    raw: Mapping[str, Tensor], tokens_key: str, tokens: Tensor, mask: Tensor, where: str
) -> dict[str, Tensor]:
    """The prompts of verl's layout: ids and mask [N, P], and the response's attention [N, T]."""
    n, t = tokens.shape
    full = raw.get("attention_mask")
    if "prompts" in raw:
        ids = raw["prompts"]
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] == 0:
            raise GradlensError(
                f"{where}: 'prompts' has shape {tuple(ids.shape)}; expected [N, P] with N = {n} "
                "and P ≥ 1"
            )
        p = ids.shape[1]
        if "prompt_mask" in raw:
            prompt_mask = raw["prompt_mask"]
            if tuple(prompt_mask.shape) != (n, p):
                raise GradlensError(
                    f"{where}: 'prompt_mask' has shape {tuple(prompt_mask.shape)}; expected "
                    f"[N, P] = {(n, p)} like 'prompts'"
                )
        elif full is not None and tuple(full.shape) == (n, p + t):
            prompt_mask = full[:, :p]
        else:
            got = "" if full is None else f" ('attention_mask' has shape {tuple(full.shape)})"
            raise GradlensError(
                f"{where}: 'prompts' needs a mask of its left padding: 'prompt_mask' [N, P] = "
                f"{(n, p)} or 'attention_mask' over prompt + response [N, P+T] = {(n, p + t)}" + got
            )
    elif tokens_key == "responses" and "input_ids" in raw:
        seq = raw["input_ids"]
        if seq.dim() != 2 or seq.shape[0] != n or seq.shape[1] <= t:
            raise GradlensError(
                f"{where}: 'input_ids' has shape {tuple(seq.shape)}; beside 'responses' [N, T] = "
                f"{(n, t)} it must be the whole prompt + response, [N, P+T] with P ≥ 1"
            )
        if full is None or full.shape != seq.shape:
            got = "none" if full is None else f"shape {tuple(full.shape)}"
            raise GradlensError(
                f"{where}: 'input_ids' [N, P+T] needs an 'attention_mask' of the same shape "
                f"{tuple(seq.shape)} (got {got})"
            )
        p = seq.shape[1] - t
        if not torch.equal(_integers(seq, "input_ids", where)[:, p:][mask], tokens[mask]):
            raise GradlensError(
                f"{where}: the last T = {t} columns of 'input_ids' are not 'responses' (at the "
                "tokens in the loss); 'input_ids' must be the prompt followed by the response, "
                "as verl stores it"
            )
        ids, prompt_mask = seq[:, :p], full[:, :p]
    else:
        raise GradlensError(
            f"{where}: the batch has no prompt tokens, which source.model_path needs to "
            "recompute the hidden states: give 'prompts' [N, P] (left-padded, with "
            "'prompt_mask' [N, P] or 'attention_mask' [N, P+T]), or 'input_ids' and "
            f"'attention_mask' [N, P+T] beside 'responses' [N, T]; keys present: "
            f"{', '.join(sorted(raw))}"
        )
    if full is not None and tuple(full.shape) == (n, p + t):
        attention = _mask(full, "attention_mask", where, ATTENTION)[:, p:]
    else:  # real up to the last token in the loss: a causal model never reads what follows
        attention = mask.flip(1).cummax(dim=1).values.flip(1)
    if bool((mask & ~attention).any()):
        raise GradlensError(
            f"{where}: the response mask puts tokens into the loss that 'attention_mask' marks "
            "as padding"
        )
    ids_key = "prompts" if "prompts" in raw else "input_ids"
    prompt_mask = _mask(
        prompt_mask, "prompt_mask" if "prompt_mask" in raw else "attention_mask", where, ATTENTION
    )
    return {
        "prompt_ids": _integers(ids, ids_key, where, prompt_mask),
        "prompt_mask": prompt_mask,
        "response_attention": attention,
    }


def _jsonl_row(data: Mapping[str, Tensor], i: int, length: int) -> dict[str, Any]:
    """Line i of a .jsonl file: the response keys up to ``length``; a prompt unpadded, and an
    ``attention_mask`` over prompt + response as its real prompt part ++ its response part (the
    reader splits it where the response starts, `_pad_whole_sequence`)."""
    prompts, full = data.get("prompts"), data.get("attention_mask")
    p = 0 if prompts is None else prompts.shape[1]
    t = data["response_mask"].shape[1]
    whole = full is not None and p > 0 and full.dim() == 2 and full.shape[1] == p + t
    real = None  # this line's real prompt columns
    if prompts is not None:
        if whole and full is not None:
            real = full[i, :p].bool()
        elif "prompt_mask" in data:
            real = data["prompt_mask"][i].bool()
        else:
            real = torch.ones(p, dtype=torch.bool)
    row: dict[str, Any] = {}
    for key, value in data.items():
        if key in SHARED:
            if i == 0:
                row[key] = value.double().tolist()
        elif key == "prompt_mask" and real is not None:
            continue  # implied by the unpadded prompt
        elif key == "prompts" and real is not None:
            row[key] = value[i][real].tolist()
        elif key == "attention_mask" and whole and real is not None:
            row[key] = value[i, :p][real].tolist() + value[i, p : p + length].tolist()
        elif value.dim() >= 2:
            row[key] = value[i, :length].tolist()
        else:
            row[key] = value[i].item()
    return row


def write_batch(path: Path, tensors: Mapping[str, Tensor | None], option: str = "--output") -> None:
    """Write gradlens-named tensors under the frameworks' key names, format by suffix.

    Through `gradlens.files.writing`: the file appears whole or not at all, and an OS error (a
    read-only directory, a full disk) is a `GradlensError` naming ``option``.
    """
    names = {g: ALIASES[g][0] for g in ALIASES}
    data: dict[str, Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        if v is None:
            continue
        x = v.detach().cpu().contiguous()
        storage = x.untyped_storage().data_ptr()
        if storage in storages:  # the same memory under two keys (a synthetic teacher's hidden
            x = x.clone()  # states are the student's): safetensors stores each key's own copy
        storages.add(storage)
        data[names[k]] = x
    suffix = check_batch_suffix(path, option)
    if suffix == ".safetensors":
        from safetensors.torch import save

        payload = save(data)  # serialised here, so that the bytes go through Python's I/O
        with writing(path, option, "wb") as fh:
            fh.write(payload)
    elif suffix in (".pt", ".pth"):
        with writing(path, option, "wb") as fh:
            torch.save(data, fh)
    else:
        mask = data["response_mask"].bool()
        with writing(path, option) as fh:
            for i in range(mask.shape[0]):
                length = int(mask[i].nonzero().max()) + 1 if mask[i].any() else 0
                fh.write(json.dumps(_jsonl_row(data, i, length)) + "\n")


def check_batch_suffix(path: Path, option: str = "--output") -> str:
    """The batch-file format of ``path`` by its suffix, or a `GradlensError` naming ``option``."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise GradlensError(
            f"{option} {str(path)!r}: unknown format {suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    return suffix
