"""Shared pytest setup: make ``tests/helpers.py`` importable as ``helpers``.

pytest's default import mode only puts this folder on ``sys.path`` while there is no
``tests/__init__.py``; adding it here keeps ``from helpers import ...`` working either way.

Without CUDA, Triton's kernels can only run in its interpreter, which Triton chooses once, when
it is first imported: ask for it here, before any test imports the fused engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
