"""Shared pytest setup: the import path, and Triton's interpreter on machines without CUDA.

``tests/helpers.py`` is imported as ``helpers``: this folder goes on ``sys.path``.

The tensor-parallel tests spawn processes that unpickle their rank functions by module name
(``tests.compare.test_tensor_parallel.compare_ranks``), so ``tests`` must resolve to this folder
in every process. Some installed packages ship a top-level ``tests`` package of their own (verl
does); ``tests`` here is a regular package and the repository root goes first on ``sys.path``,
which spawned processes inherit, so ours is the one found.

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

_HERE = Path(__file__).resolve().parent
for _folder in (str(_HERE), str(_HERE.parent)):
    if _folder in sys.path:
        sys.path.remove(_folder)
    sys.path.insert(0, _folder)
