"""The exception types that carry a message meant for the user.

The CLI prints a `GradlensError` as a single clear message on stderr and exits non-zero; any
other exception is a bug in gradlens and is shown with a traceback only under ``--debug``.
Under tensor parallelism a `SharedError` is one that every rank raised alike: rank 0 prints it.
"""

import difflib


class GradlensError(Exception):
    """Bad input or an impossible request, explained in words a user can act on."""


class SharedError(GradlensError):
    """A `GradlensError` raised with the same message on every rank of a process group (the
    ranks agreed on it), so that one rank (rank 0) reports it for all."""


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """'unknown loss 'ppo_clp'; did you mean 'ppo_clip'? (valid: ...)' — for every registry."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})"
