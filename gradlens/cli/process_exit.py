"""The end of a ``gradlens`` process: its output flushed, its exit handlers run, no teardown.

After the command, the interpreter's own shutdown tears the process down object by object:
one more full collection of the cyclic garbage collector over everything still alive — after a
model-source run torch, transformers and what they import, and the model's modules, about
400,000 objects — then the modules one by one. That took 0.94–1.08 s of a 27–30 s process on
the 2-core development machine (from the run's last line to the process's end, six runs; a
profile of the exiting process: 0.78 s in the collector; docs/performance.md), and it frees
nothing that the system does not take back whole when the process ends. Moving every object out
of the collector's reach (``gc.freeze``) saved the sweep but not the rest, and an extension
module that counts its objects at unload (Triton's, imported by torch) then reported them all
as leaked on stderr.

So `exit_process` does what the shutdown does that anyone can observe, and skips the rest: it
flushes stdout and stderr, runs the atexit handlers (the temporary offload folder of
`gradlens.sources.checkpoint`, weakref finalizers, torch's and transformers' own), and ends the
process with ``os._exit`` and the command's status. Only the console entry point calls it: a
process that imports gradlens and goes on (the tests, a trainer with the hook) ends as it would.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import suppress
from typing import NoReturn


def exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` gives: None is 0, an int itself, anything else (a
    message, which Python prints to stderr) 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return 1


def exit_process(code: object = 0) -> NoReturn:
    """End the process now with the status of ``sys.exit(code)`` (a non-int ``code`` is
    printed to stderr first, as Python does): stdout and stderr flushed, the atexit handlers
    run, no teardown (module docstring)."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to say
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(exit_status(code))
