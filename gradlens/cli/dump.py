"""``gradlens dump``: write the batch of any source as a rollout batch file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradlens.cli.common import (
    ConfigOption,
    DebugOption,
    SetOption,
    output_file,
    stderr_console,
    user_errors,
)

HELP = (
    "Write the batch a config describes (synthetic, literal, model, or another batch file) as a "
    "rollout batch file: responses, response_mask, old_log_probs, advantages, hidden_states, "
    "lm_head_weight (and rollout_log_probs / ref_log_prob when the source has them, and the "
    "teacher_* keys of a distillation teacher), under the key names verl uses. A batch from a "
    "real model (source.kind=model, or a batch file with "
    "source.model_path) also gets its prompts and attention_mask, verl's layout, so that "
    "source.model_path can recompute it, and tokenizer_sha256, the digest of the tokenizer's "
    "vocabulary, so that a read-back with another tokenizer is refused. The format follows "
    "the suffix: .safetensors, .pt, .jsonl. Read it back with --set source.kind=batch --set "
    "source.path=FILE."
)


def dump(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            parser=output_file,
            help="File to write: .safetensors, .pt (a torch.save dict) or .jsonl (small "
            "batches). Missing parent directories are created; the file appears only once "
            "complete.",
        ),
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Write the configured batch as a rollout batch file."""
    with user_errors(debug):
        from gradlens.batchfile import check_batch_suffix, write_batch
        from gradlens.cli.progress import progress_bar
        from gradlens.compare.run import resolve_device, source_context
        from gradlens.config import build_config
        from gradlens.files import check_output
        from gradlens.progress import reporting
        from gradlens.sources import build_source
        from gradlens.sources.batch import dump_tensors

        check_output(output, "--output")  # a path that cannot be written: refused before any work
        check_batch_suffix(output)
        cfg = build_config(config, overrides or [])
        with progress_bar() as callback, reporting(callback):
            batch = build_source(cfg.source, source_context(cfg, resolve_device(cfg.device)))
        tensors = dump_tensors(batch)
        write_batch(output, tensors)
        prompts = tensors.get("prompts")
        stderr_console().print(
            f"wrote {output}: {batch.num_sequences} sequences, {batch.num_tokens} tokens, "
            f"V={batch.vocab_size}, H={batch.hidden_size}"
            + ("" if prompts is None else f"; prompts of ≤{prompts.shape[1]} tokens")
        )
