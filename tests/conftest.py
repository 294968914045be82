"""Shared pytest setup: make ``tests/helpers.py`` importable as ``helpers``.

pytest's default import mode only puts this folder on ``sys.path`` while there is no
``tests/__init__.py``; adding it here keeps ``from helpers import ...`` working either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
