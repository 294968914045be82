"""The one exception type that carries a message meant for the user.

The CLI prints a `GradlensError` as a single clear message on stderr and exits non-zero; any
other exception is a bug in gradlens and is shown with a traceback only under ``--debug``.
"""


class GradlensError(Exception):
    """Bad input or an impossible request, explained in words a user can act on."""
