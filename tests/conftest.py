"""Shared pytest setup: the import path, the CPU kernels (``tests/cpu_kernels.py``), Triton's
interpreter on machines without CUDA, and the fast subset (``-m "not slow"``).

``tests/helpers.py`` is imported as ``helpers``: this folder goes on ``sys.path``.

The tensor-parallel tests spawn processes that unpickle their rank functions by module name
(``tests.compare.test_tensor_parallel.compare_ranks``), so ``tests`` must resolve to this folder
in every process. Some installed packages ship a top-level ``tests`` package of their own (verl
does); ``tests`` here is a regular package and the repository root goes first on ``sys.path``,
which spawned processes inherit, so ours is the one found.

Without CUDA, Triton's kernels can only run in its interpreter, which Triton chooses once, when
it is first imported: ask for it here, before any test imports the fused engine.

The fast subset. ``python -m pytest -q`` runs everything (CI does); ``python -m pytest -q -m
"not slow"`` leaves out the tests marked ``slow``, so that the inner loop takes under a
minute on an idle two-core machine. A test is slow when it

- spawns processes (tensor parallelism under gloo or torchrun, ``python -m gradlens``): the
  cheapest spawning test still takes several seconds, so none stays in the fast subset,
- builds or loads a checkpoint, or samples from the built-in model,
- runs a whole compare or diagnose on the synthetic default batch (seconds each; the default
  runs once, in ``tests/cli/test_cli.py``'s ``default_json``), both engines on it, a
  131k–262k vocabulary, or Triton's interpreter over a 32k one,
- imports verl for its global-batch aggregation, trains with TRL, or runs the documented
  framework commands,
- draws many samples (the property tests over whole batches, the samplers' checks),
- or is a case of a registry product beyond its representative slice (below).

Those are marked where they are written (``@pytest.mark.slow``, ``pytestmark``, or a case's
``slow`` flag in ``tests/golden/cases.py``), except the products, which are thinned here.

Registry products. A test parametrized over the registries (every loss × every aggregation ×
a setting, a correction or a dtype) multiplies as losses are added. For every test function
with more than ``PRODUCT_CASES`` cases, the fast subset keeps, in collection order, each case
that brings a parameter value no earlier kept case of that function had, and marks the rest
slow — with one exception: a registered loss name counts as a new value only in a function
marked ``every_loss``. So tests/test_grads.py's float64 check (marked so) runs every loss
once, with the first aggregation and setting, and every aggregation and setting once; every
other product runs each of its aggregations, corrections, settings or dtypes once, with the
losses they come with. A function whose every case brings a new value (a hand-written list of
cases, each documented error once) keeps them all.

What stays in the fast subset, so that a broken module still fails it: every loss against
autograd in float64 (tests/test_grads.py) and each aggregation, setting, correction or dtype
of every other product once; the hand-computed cases; the framework twins (TRL's, verl's and
OpenRLHF's loss functions); the streamed engine, one case of the fused kernels and vocabulary
parallelism on small vocabularies, and the zero-sum check at 32k; tensor parallelism's
argument checks and sharding (in-process); the model source's error messages; the batch file
in float64 and its error messages; the synthetic source's shapes and entropy target; the
sweep; the trace; every documented CLI error but the three known only after a whole run; the
default report once; the golden reports of the hand-written configs and the sweeps; the
renderers.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _folder in (str(_HERE), str(_HERE.parent)):
    if _folder in sys.path:
        sys.path.remove(_folder)
    sys.path.insert(0, _folder)

from cpu_kernels import pin  # noqa: E402

pin()  # before the first tensor operation: the same kernels on every x86 CPU

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gradlens.losses import loss_names  # noqa: E402  (after the repository root is on the path)

# A test function parametrized into more cases than this is a registry product (docstring).
PRODUCT_CASES = 8


def _value_key(value: object) -> object:
    """A parameter value as a set member: itself when hashable, else its repr."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow each case of a registry product that brings no new parameter value."""
    losses = set(loss_names())
    functions: dict[tuple[object, str], list[pytest.Function]] = defaultdict(list)
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and hasattr(item, "callspec")
            and item.get_closest_marker("slow") is None
        ):
            functions[(item.parent, item.originalname)].append(item)
    for cases in functions.values():
        if len(cases) <= PRODUCT_CASES:
            continue
        every_loss = cases[0].get_closest_marker("every_loss") is not None
        seen: set[tuple[str, object]] = set()
        for case in cases:
            values = {
                (name, _value_key(v))
                for name, v in case.callspec.params.items()
                if every_loss or not (isinstance(v, str) and v in losses)
            }
            if values <= seen:
                case.add_marker(pytest.mark.slow)
            else:
                seen |= values
