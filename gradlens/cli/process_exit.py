"""The end of a ``gradlens`` process: no last sweep of the cyclic garbage collector.

When the interpreter exits, CPython runs one more full collection of the cyclic garbage
collector, which traverses every object still alive. After a model-source run that is torch,
transformers and what they import, and the model's modules (about 400,000 objects), and the
sweep took 0.8–1.1 s of a 27–30 s process on the 2-core development machine (measured from the
run's last line to the process's end, with and without `skip_final_collection`: 0.95–1.08 s
against 0.22 s; docs/performance.md). Nothing it could find then matters: the process is
ending and its memory goes back to the system whole; the atexit handlers (the temporary
offload folder of `gradlens.sources.checkpoint`) and weakref finalizers run as before.

`skip_final_collection` moves every object into the collector's permanent generation
(``gc.freeze``), which that sweep does not traverse. Only the console entry point calls it, as
its last step: a process that imports gradlens and goes on (the tests, a trainer with the
hook) keeps its collector as it was.
"""

from __future__ import annotations

import gc


def skip_final_collection() -> None:
    """Spare the exiting process the collector's last full sweep (module docstring). Call it
    only when nothing but the interpreter's exit follows: garbage cycles alive now are never
    collected afterwards."""
    gc.freeze()
