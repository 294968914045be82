"""Fixtures of the compare tests: three user implementations of PPO-clip for parity, and tiny
random checkpoints of three architectures for the whole-model gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import IMPLEMENTATIONS


@pytest.fixture
def impl(tmp_path: Path) -> str:
    """The implementations written to a file; their names are ``{impl}:token_mean``, ..."""
    path = tmp_path / "impl.py"
    path.write_text(IMPLEMENTATIONS)
    return str(path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama (untied), GPT-2 (tied embeddings) and Phi (an lm_head bias) tiny checkpoints."""
    pytest.importorskip("transformers")
    from tiny_checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_checkpoint(root / arch, arch) for arch in ("llama", "gpt2", "phi")}
