"""Fixtures of the compare tests: three user implementations of PPO-clip for parity."""

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
