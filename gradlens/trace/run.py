"""``gradlens trace DIR_OR_GLOB``: read a run's files, diagnose its batch files, find spikes.

Inputs (gradlens.run_files): the metrics JSONL a hook logged (``metrics.jsonl``,
or any ``.jsonl`` whose first object has a ``step`` and no ``responses``) and batch files
(``.safetensors``, ``.pt``, ``.pth``, other ``.jsonl``). A batch file is diagnosed with the
settings of its sidecar (``step_000120.json``: losses, loss, dtype, diagnostics; else the
default losses) and placed at the sidecar's ``step``, or else at the last number in its name
(or, with no number, after the numbered files in name order). Its numbers fill the columns
the metrics JSONL lacks at that step. A file that cannot be read or diagnosed is reported by
name and skipped; the trace goes on.

Spikes: `gradlens.diagnostics.spikes.mad_scores` over ``grad_norm`` (or, without it, the first
loss's lm_head norm). For a spike step with a batch file, the largest contributors of its first
loss (`gradlens.diagnostics.contributors`), decoded when a tokenizer is known (``--tokenizer``,
or the sidecar's ``model_path``: ``builtin`` or a local checkpoint directory).
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.batchfile import SUFFIXES, peek_tokenizer_sha256
from gradlens.compare.run import compare_batch, resolve_device, source_context
from gradlens.config import Config, validate
from gradlens.containers import Batch
from gradlens.diagnostics.contributors import Decode, contributors, token_grad_norms
from gradlens.diagnostics.spikes import mad_scores
from gradlens.errors import GradlensError
from gradlens.files import decode_reason
from gradlens.grads import effective_old_logp, objective, on_grid, softmax_view
from gradlens.losses import get_loss
from gradlens.progress import report
from gradlens.results.trace import (
    BadFile,
    SpikeDetail,
    TraceColumn,
    TraceReport,
    TraceStep,
)
from gradlens.run_files import METRICS_FILE, sidecar_path
from gradlens.sources import build_source
from gradlens.sources.checkpoint import builtin_model_dir
from gradlens.sources.tokenizer_digest import vocabulary_sha256

# (pattern over the flat metric names, label with {loss}, figure panel); the table's order
COLUMN_RULES: list[tuple[str, str, str]] = [
    (r"grad_norm", "grad_norm", "gradient norm"),
    (r"gradlens/(?P<loss>[^/]+)/lm_head_norm", "{loss} ‖∂L/∂W‖", "lm_head gradient norm"),
    (r"gradlens/(?P<loss>[^/]+)/clipping/region", "{loss} clip", "clip fraction"),
    (r"gradlens/ratio/p01", "ratio p01", "ratio π_θ/π_old"),
    (r"gradlens/ratio/p50", "ratio p50", "ratio π_θ/π_old"),
    (r"gradlens/ratio/p99", "ratio p99", "ratio π_θ/π_old"),
    (r"gradlens/ratio/kl_k3", "KL(old‖θ)", "KL"),
    (r"gradlens/(?P<loss>[^/]+)/metrics/kl", "{loss} KL(ref)", "KL"),
    (r"gradlens/batch/mean_entropy", "entropy", "entropy"),
    (r"gradlens/rollout/kl_k3", "mismatch KL", "training–inference mismatch"),
    (r"gradlens/rollout/abs_diff_max", "mismatch |Δℓ| max", "training–inference mismatch"),
]
SHARED_SECTIONS = ("batch", "ratio", "rollout")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TraceSettings:
    window: int = 20
    threshold: float = 5.0
    min_history: int = 3
    top_k: int = 5
    losses: tuple[str, ...] | None = None  # override every file's losses
    tokenizer: str | None = None


@dataclass
class FileEntry:
    path: Path
    sidecar: dict[str, Any]
    step: int | None


def is_metrics_file(path: Path) -> bool:
    if path.name == METRICS_FILE:
        return True
    if path.suffix != ".jsonl":
        return False
    try:
        with path.open(encoding="utf-8") as fh:  # the first line that is not blank, as read
            first = json.loads(next((line for line in fh if line.strip()), "{}"))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "step" in first and "responses" not in first


def collect(target: str) -> tuple[list[Path], list[Path]]:
    """The metrics files and batch files of a directory or a glob."""
    root = Path(target).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file())
    elif root.is_file():
        files = [root]
    else:
        files = sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    if not files:
        raise GradlensError(
            f"DIR_OR_GLOB: nothing at {target!r}; give a run's directory (metrics.jsonl, "
            "step_*.safetensors) or a glob of batch files"
        )
    metrics = [p for p in files if is_metrics_file(p)]
    batches = [p for p in files if p.suffix.lower() in SUFFIXES and p not in metrics]
    if not metrics and not batches:
        raise GradlensError(
            f"DIR_OR_GLOB: {target!r} holds no metrics JSONL and no batch file "
            f"({', '.join(SUFFIXES)})"
        )
    return metrics, batches


def read_metrics(path: Path, bad: list[BadFile]) -> dict[int, dict[str, float | None]]:
    rows: dict[int, dict[str, float | None]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        bad.append(BadFile(name=path.name, error=str(exc)))
        return rows
    except UnicodeDecodeError as exc:
        bad.append(BadFile(name=path.name, error=f"not a metrics file: {decode_reason(exc)}"))
        return rows
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
                    type(data)
                )
                raise TypeError(f"a JSON {kind or 'number'}, not an object")
            step = whole_step(data["step"])
        except (ValueError, KeyError, TypeError) as exc:
            bad.append(BadFile(name=f"{path.name}:{number}", error=f"not a metrics line: {exc}"))
            continue
        row = rows.setdefault(step, {})
        for key, value in data.items():
            where = f"{path.name}:{number}"
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                try:
                    number_value = float(value)
                except OverflowError:  # an integer beyond float's range (JSON's 1e400 is inf)
                    bad.append(BadFile(name=where, error=f"{key!r} is beyond a float: left out"))
                    continue
                conflict = merged_value(row, key, number_value, step)
                if conflict is not None:
                    bad.append(BadFile(name=where, error=conflict))
            elif value is not None and key != "step" and shown_column(key):
                bad.append(
                    BadFile(
                        name=where,
                        error=f"{key!r} is {json.dumps(value)}, not a number: left out",
                    )
                )
    return rows


def merged_value(
    row: dict[str, float | None], key: str, value: float | None, step: int
) -> str | None:
    """Put ``value`` into the step's ``row``, or say why not: a metric given twice at one step
    with another value (a second line, or another metrics file) keeps its first value, as a
    second batch file at one step is left out; lines that give a step other metrics add them."""
    if key in row and not same_number(row[key], value):
        return (
            f"{key!r} at step {step} is {value!r} here and {row[key]!r} before: this one left "
            "out (one value per metric and step)"
        )
    row.setdefault(key, value)
    return None


def same_number(a: float | None, b: float | None) -> bool:
    """Equal, NaN equal to NaN (a line repeated verbatim is no conflict)."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def shown_column(key: str) -> bool:
    """Whether a metric is one of the columns the trace shows (`COLUMN_RULES`)."""
    return any(re.fullmatch(pattern, key) for pattern, _, _ in COLUMN_RULES)


def whole_step(value: Any) -> int:
    """A metrics line's step: a whole number (JSON may write it 3 or 3.0), never rounded."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"'step' is {value!r}, not a number")
    if isinstance(value, float) and not value.is_integer():  # 1.5, inf (JSON's 1e400), NaN
        raise ValueError(f"'step' is {value!r}, not a whole number")
    return int(value)


def file_entry(path: Path) -> FileEntry:
    sidecar: dict[str, Any] = {}
    side = sidecar_path(path)
    if side.is_file() and side != path:
        try:
            loaded = json.loads(side.read_text(encoding="utf-8"))
            sidecar = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            sidecar = {}
    try:
        step: int | None = whole_step(sidecar.get("step"))  # as a metrics line's: true is no 1
    except (TypeError, ValueError):  # none, or not a whole number: the name places the file
        numbers = re.findall(r"\d+", path.stem)
        step = int(numbers[-1]) if numbers else None
    return FileEntry(path, sidecar, step)


def file_config(entry: FileEntry, settings: TraceSettings) -> Config:
    """The config of one batch file: its sidecar's settings as written (a wrong type is the
    config's error, naming the sidecar and the setting; a string of losses is not a list)."""
    side = entry.sidecar
    diagnostics = side.get("diagnostics")
    if diagnostics is None:
        diagnostics = {}
    data: dict[str, Any] = {
        "source": {"kind": "batch", "path": str(entry.path)},
        "diagnostics": {"reference": "none", **diagnostics}
        if isinstance(diagnostics, dict)
        else diagnostics,  # the config's own error names it
    }
    if side.get("dtype"):
        data["dtype"] = side["dtype"]
    losses = list(settings.losses) if settings.losses else side.get("losses")
    if losses:
        data["losses"] = losses
    if side.get("loss"):
        data["loss"] = side["loss"]
    origin = entry.path.name
    if side:
        origin += f" with its sidecar {sidecar_path(entry.path).name}"
    return validate(data, origin=origin)


def diagnose_file(entry: FileEntry, settings: TraceSettings) -> tuple[dict[str, float], Config]:
    """``report.metrics()`` of one batch file, as ``gradlens compare`` would compute it."""
    config = file_config(entry, settings)
    device = resolve_device(config.device)
    batch = build_source(config.source, source_context(config, device))
    return compare_batch(batch, config, device).metrics(), config


def load_batch(config: Config) -> Batch:
    device = resolve_device(config.device)
    return build_source(config.source, source_context(config, device))


def columns(rows: dict[int, dict[str, float | None]]) -> list[TraceColumn]:
    keys = sorted({k for row in rows.values() for k in row})
    out = []
    for pattern, label, group in COLUMN_RULES:
        for key in keys:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            loss = match.groupdict().get("loss")
            if loss in SHARED_SECTIONS:
                continue
            out.append(TraceColumn(key=key, label=label.format(loss=loss), group=group))
    return out


@dataclass(frozen=True)
class Decoder:
    """Token ids → text by the tokenizer at ``where``, whose vocabulary has the digest
    ``vocabulary`` (`gradlens.sources.tokenizer_digest`; None: it cannot list it)."""

    decode: Decode
    where: str
    vocabulary: Tensor | None

    def for_file(self, path: Path) -> tuple[Decode | None, str | None]:
        """(the decoder, None) for a batch file this tokenizer made, or one that does not say
        which did; (None, why) for a file whose ``tokenizer_sha256`` is another vocabulary's:
        its tokens are then shown as ids, not as another tokenizer's text."""
        stored = peek_tokenizer_sha256(path)
        if stored is None or self.vocabulary is None or torch.equal(stored, self.vocabulary):
            return self.decode, None
        return None, (
            f"tokens shown as ids: {path.name}'s tokenizer_sha256 is not the vocabulary of the "
            f"tokenizer {self.where!r} (--tokenizer, or a sidecar's model_path), which would "
            "decode them as other tokens"
        )


def tokenizer_decode(settings: TraceSettings, sidecars: list[dict[str, Any]]) -> Decoder | None:
    """A decoder from ``--tokenizer`` or a sidecar's model_path; None when none loads."""
    where = settings.tokenizer
    if where is None:
        where = next((s["model_path"] for s in sidecars if s.get("model_path")), None)
    if where is None:
        return None
    path = builtin_model_dir() if where == "builtin" else Path(where).expanduser()
    if not path.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # a checkpoint without tokenizer files: tokens stay ids
        return None
    return Decoder(lambda ids: str(tok.decode(ids)), where, vocabulary_sha256(tok))


def spike_detail(
    step: TraceStep,
    series: str,
    entry: FileEntry | None,
    config: Config | None,
    settings: TraceSettings,
    decoder: Decoder | None,
) -> SpikeDetail:
    value = step.values[series]
    shown = value if value is not None and math.isfinite(value) else None
    base = dict(step=step.step, series=series, value=shown, median=step.median, z=step.z)
    if entry is None or config is None:
        return SpikeDetail(
            **base, batch_file=None, loss=None, note="no batch file at this step: no contributors"
        )
    batch = load_batch(config)
    view = softmax_view(batch)
    name = config.losses[0]
    obj = objective(
        batch,
        view.logp,
        get_loss(name),
        config.loss.params(),
        config.loss.token_aggregation(),
        view.entropy_grid(),
    )
    c = obj.coefficient
    flat = token_grad_norms(
        c[view.rows, view.cols], view.sampled_probs, (view.probs * view.probs).sum(-1)
    )
    norms = on_grid(flat, view.rows, view.cols, view.logp.shape)
    ratio = (view.logp - effective_old_logp(batch, view.logp)).exp()
    decode, note = (None, None) if decoder is None else decoder.for_file(entry.path)
    seqs, toks = contributors(
        c, norms, batch.tokens, batch.mask, batch.advantages, ratio, settings.top_k, decode
    )
    return SpikeDetail(
        **base, batch_file=entry.path.name, loss=name, sequences=seqs, tokens=toks, note=note
    )


def trace_run(target: str, settings: TraceSettings | None = None) -> TraceReport:
    """The whole trace of ``target`` (see the module docstring)."""
    settings = settings or TraceSettings()
    if settings.tokenizer not in (None, "builtin"):
        given = Path(settings.tokenizer).expanduser()
        if not given.is_dir():
            raise GradlensError(
                f"--tokenizer: {settings.tokenizer!r} is not a directory; give a checkpoint or "
                "tokenizer directory (or builtin)"
            )
    if settings.losses:  # one mistake for every file: refused once, before any work
        validate({"losses": list(settings.losses)}, origin="--losses")
    metric_files, batch_files = collect(target)
    bad: list[BadFile] = []
    rows: dict[int, dict[str, float | None]] = {}
    sources: dict[int, list[str]] = {}
    for path in metric_files:
        for step, row in read_metrics(path, bad).items():
            merged = rows.setdefault(step, {})
            for key, value in row.items():
                conflict = merged_value(merged, key, value, step)
                if conflict is not None:
                    bad.append(BadFile(name=path.name, error=conflict))
            sources.setdefault(step, []).append(path.name)
    entries = [file_entry(p) for p in batch_files]
    numbered = sorted((e for e in entries if e.step is not None), key=lambda e: e.step or 0)
    last = max([*rows, *(e.step or 0 for e in numbered)], default=0)
    for offset, e in enumerate(
        sorted((e for e in entries if e.step is None), key=lambda e: e.path.name)
    ):
        e.step = last + offset + 1
    by_step: dict[int, tuple[FileEntry, Config]] = {}
    ordered: list[FileEntry] = []
    first_at: dict[int, str] = {}
    for entry in sorted(entries, key=lambda e: (e.step or 0, e.path.name)):
        assert entry.step is not None
        if entry.step in first_at:  # which one the step's numbers came from would be a guess
            bad.append(
                BadFile(
                    name=entry.path.name,
                    error=f"step {entry.step} already has {first_at[entry.step]}; one batch "
                    "file per step (a sidecar's 'step' places a file): left out",
                )
            )
            continue
        first_at[entry.step] = entry.path.name
        ordered.append(entry)
    for done, entry in enumerate(ordered):
        report("trace files", done, len(ordered))
        try:
            metrics, config = diagnose_file(entry, settings)
        except Exception as exc:  # a bad file is reported by name and skipped
            message = str(exc) if isinstance(exc, GradlensError) else f"{type(exc).__name__}: {exc}"
            bad.append(BadFile(name=entry.path.name, error=message))
            continue
        assert entry.step is not None
        row = rows.setdefault(entry.step, {})
        for key, value in metrics.items():
            row.setdefault(key, value)
        if "grad_norm" not in row and isinstance(entry.sidecar.get("grad_norm"), int | float):
            row["grad_norm"] = float(entry.sidecar["grad_norm"])
        sources.setdefault(entry.step, []).append(entry.path.name)
        by_step[entry.step] = (entry, config)
    report("trace files", len(ordered), len(ordered))
    if not rows:  # every metrics line and batch file was skipped
        reasons = "; ".join(f"{b.name}: {b.error}" for b in bad[:3]) or (
            "its metrics files hold no line and it has no batch file"
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise GradlensError(f"DIR_OR_GLOB: nothing in {target!r} could be traced: {reasons}{more}")
    cols = columns(rows)
    keys = {c.key for c in cols}
    # without the trainer's grad_norm, the first loss's lm_head norm (the loss whose
    # contributors a spike lists), else any loss's
    earliest = min(by_step, default=None)
    preferred = (
        None if earliest is None else f"gradlens/{by_step[earliest][1].losses[0]}/lm_head_norm"
    )
    series = (
        "grad_norm"
        if "grad_norm" in keys
        else preferred
        if preferred in keys
        else next((c.key for c in cols if c.key.endswith("/lm_head_norm")), None)
    )
    steps_sorted = sorted(rows)
    values = [rows[s].get(series) if series else None for s in steps_sorted]
    scores = mad_scores(values, settings.window, settings.threshold, settings.min_history)
    steps = [
        TraceStep(
            step=s,
            values={c.key: rows[s].get(c.key) for c in cols},
            sources=sources.get(s, []),
            batch_file=by_step[s][0].path.name if s in by_step else None,
            median=score.median,
            z=score.z,
            spike=score.spike,
        )
        for s, score in zip(steps_sorted, scores, strict=True)
    ]
    decoder = tokenizer_decode(settings, [e.sidecar for e, _ in by_step.values()])
    spikes = []
    for item in steps:
        if not item.spike or series is None:
            continue
        found = by_step.get(item.step)
        try:
            spikes.append(
                spike_detail(
                    item,
                    series,
                    found[0] if found else None,
                    found[1] if found else None,
                    settings,
                    decoder,
                )
            )
        except Exception as exc:
            name = found[0].path.name if found else f"step {item.step}"
            bad.append(BadFile(name=name, error=f"contributors: {type(exc).__name__}: {exc}"))
    return TraceReport(
        target=target,
        series=series,
        window=settings.window,
        threshold=settings.threshold,
        columns=cols,
        steps=steps,
        spikes=spikes,
        bad_files=bad,
    )
