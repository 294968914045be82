"""Loading a causal-LM checkpoint from a local directory, never from the Hub.

``source.path`` (or ``source.model_path`` of a batch file) names a Hugging Face checkpoint
directory (config.json, weights, tokenizer files), loaded with
``transformers.AutoModelForCausalLM.from_pretrained`` in the run's dtype and on its device;
``null`` (``builtin`` for a batch file) is the tiny model that ships inside gradlens, loaded
through exactly the same code. A path that is not a local directory is an error whose message
says how to download a Hub id first.
"""

from __future__ import annotations

import atexit
import importlib.resources
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradlens.containers import LoadedModel
from gradlens.errors import GradlensError
from gradlens.memory import Estimate, dtype_bytes
from gradlens.sources.tokenizer_digest import check_same_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def builtin_model_dir() -> Path:
    """The directory of the tiny model that ships with gradlens (scripts/train_tiny_lm.py)."""
    return Path(str(importlib.resources.files("gradlens") / "data" / "tiny_lm"))


def checkpoint_dir(path: str | None, key: str = "source.path") -> Path:
    """The checkpoint directory, checked for the files a causal LM needs; errors name ``key``."""
    if path is None:
        where = builtin_model_dir()
        if not (where / "config.json").is_file():
            raise GradlensError(
                f"{key}: the built-in model is missing from the installation ({where}); "
                "reinstall gradlens or run scripts/train_tiny_lm.py"
            )
        return where
    where = Path(path).expanduser()
    if not where.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = (
            "; it looks like a Hugging Face Hub id, but gradlens never downloads at run time: "
            f"download it first (e.g. `huggingface-cli download {path} --local-dir DIR`) "
            "and pass that DIR"
            if looks_like_hub_id
            else ""
        )
        raise GradlensError(f"{key}: {path!r} is not a local directory{hint}")
    if not where.is_dir():
        raise GradlensError(f"{key}: {path!r} is a file; give the checkpoint directory")
    if not (where / "config.json").is_file():
        raise GradlensError(
            f"{key}: {path!r} has no config.json; a Hugging Face checkpoint directory "
            "holds config.json, the weights (*.safetensors) and the tokenizer files"
        )
    if not any(any(where.glob(p)) for p in WEIGHT_PATTERNS):
        raise GradlensError(f"{key}: {path!r} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise GradlensError(
            f"{key}: {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))"
        )
    return where


def load_checkpoint(
    path: str | None,
    device: torch.device,
    dtype: torch.dtype,
    key: str = "source.path",
    device_map: str | dict[str, str | int] | None = None,
    chat_template: bool = False,
    made_ids: tuple[Tensor, str] | None = None,
) -> LoadedModel:
    """Model and tokenizer from a local directory (never the Hub), with consistency checks.

    ``path`` None is the built-in model; every error names the config key ``key``.
    ``device_map``: accelerate's placement of the modules, handed to ``from_pretrained`` (with a
    temporary offload folder, removed at exit, when it puts modules on ``disk``); None: the
    whole model on ``device``. The lm_head must not be offloaded: its weight is read whole.
    ``chat_template``: the prompts go through the tokenizer's chat template, which it must have.
    ``made_ids``: (the ``tokenizer_sha256`` a batch file records, the file's name): the file's
    token ids must be this tokenizer's (`gradlens.sources.tokenizer_digest`).
    The tokenizer loads first (a fraction of a second), so that what it alone refuses is refused
    before the model loads.
    """
    where = checkpoint_dir(path, key)
    label = "the built-in model" if path is None else repr(path)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise GradlensError(f"source.kind model needs transformers ({exc})") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model: Any
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = offload_folder()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as exc:
        raise GradlensError(
            f"{key}: transformers could not load the tokenizer of {label}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if chat_template and not has_chat_template(tokenizer):
        raise GradlensError(
            f"source.chat_template: the tokenizer of {label} has no chat template "
            "(tokenizer_config.json 'chat_template', or chat_template.jinja); set "
            "source.chat_template: false for a base model"
        )
    if made_ids is not None:
        check_same_tokenizer(made_ids[0], tokenizer, key, label, made_ids[1])
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, local_files_only=True, **placement
        )
    except Exception as exc:
        where_key = "source.device_map" if device_map is not None else key
        raise GradlensError(
            f"{where_key}: transformers could not load a causal LM from {label}"
            f"{'' if device_map is None else f' with device_map {device_map!r}'}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if device_map is None:
        model = model.to(device)
    model = model.eval()
    if device_map is not None and model.get_output_embeddings().weight.device.type == "meta":
        raise GradlensError(
            f"source.device_map: {device_map!r} offloads the lm_head of {label} (its weight is on "
            "the meta device between passes); gradlens reads the whole lm_head weight: place "
            "lm_head (and a tied embedding) on cpu or a device"
        )
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    loaded = LoadedModel(model, tokenizer, where, path is None, context)
    if loaded.head is None or not hasattr(loaded.head, "weight"):
        raise GradlensError(f"{key}: {label} has no lm_head (output embedding) to analyse")
    embedding_rows = int(model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > loaded.vocab_size or len(tokenizer) > embedding_rows:
        raise GradlensError(
            f"{key}: tokenizer mismatch in {label}: the tokenizer has {len(tokenizer)} "
            f"tokens but the model's lm_head has {loaded.vocab_size} rows and its embedding "
            f"{embedding_rows}; the tokenizer files belong to a different model"
        )
    return loaded


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def offload_folder() -> str:
    """A temporary folder for the modules a device_map offloads to disk, removed at exit."""
    folder = tempfile.mkdtemp(prefix="gradlens-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load_tokenizer(path: str, key: str = "source.tokenizer") -> Any:
    """A tokenizer alone, to decode token ids: ``builtin`` (the shipped model's), a checkpoint or
    tokenizer directory (transformers' AutoTokenizer, local files only), or a ``tokenizer.json``
    file (the tokenizers library). Errors name ``key``."""
    where = builtin_model_dir() if path == "builtin" else Path(path).expanduser()
    if not where.exists():
        raise GradlensError(
            f"{key}: {path!r} does not exist; give a tokenizer directory, a tokenizer.json file "
            "or builtin"
        )
    try:
        if where.is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(where))
        if not any((where / f).is_file() for f in TOKENIZER_FILES):
            raise GradlensError(
                f"{key}: {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
            )
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except GradlensError:
        raise
    except Exception as exc:
        raise GradlensError(
            f"{key}: no tokenizer could be loaded from {path!r}: {type(exc).__name__}: {exc}"
        ) from None


def read_builtin_prompts() -> list[str]:
    """The prompts shipped with the built-in model (held-out def/class lines)."""
    path = builtin_model_dir() / "prompts.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GradlensError(
            f"source.prompts: the built-in prompts cannot be read ({exc}); give source.prompts"
        ) from None
    return list(data["prompts"])


STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class CheckpointSizes:
    """A checkpoint's sizes, read from its config.json and the sizes of its weight files
    (nothing is loaded): what the memory estimates need."""

    vocab: int
    hidden: int
    parameters: int
    context: int | None = None  # max_position_embeddings (n_positions), None if not given


def checkpoint_sizes(path: str | None) -> CheckpointSizes | None:
    """The sizes of the checkpoint at ``path`` (None: the built-in model), or None when they
    cannot be read (loading it then gives the real error)."""
    try:
        where = builtin_model_dir() if path is None else Path(path).expanduser()
        config = json.loads((where / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config", config)  # multimodal checkpoints nest the LM's
        vocab = int(text["vocab_size"])
        hidden = int(text.get("hidden_size") or text.get("n_embd") or text.get("d_model"))
        stored = STORED_BYTES.get(str(config.get("dtype") or config.get("torch_dtype")), 4)
        files = [f for p in ("*.safetensors", "pytorch_model*.bin") for f in where.glob(p)]
        weights = sum(f.stat().st_size for f in files)
        context = text.get("max_position_embeddings") or text.get("n_positions")
        context = None if context is None else int(context)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CheckpointSizes(vocab, hidden, weights // stored, context)


def checkpoint_estimate(
    sizes: CheckpointSizes,
    settings: str,
    dtype: torch.dtype,
    sequences: int,
    length: int,
    extra: tuple[tuple[str, int], ...] = (),
) -> Estimate:
    """The peak of a checkpoint's passes over ``sequences`` × ``length`` tokens: its parameters
    in the run's dtype, and the float32 logits [N, L, V] of a forward pass with their
    log-softmax and gradient (the whole-model passes run with autograd), plus ``extra``."""
    logits = sequences * length * sizes.vocab * 4 * 3
    return Estimate(
        "the checkpoint's passes",
        settings,
        (
            ("parameters", sizes.parameters * dtype_bytes(dtype)),
            ("logits [N, L, V] with their log-softmax and gradient", logits),
            *extra,
        ),
    )
