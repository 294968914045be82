"""Output files are written whole or not at all.

Every file gradlens writes (``sweep --output``, ``sweep --plot``, ``dump --output``) goes
through `replacing`: the content is written to a hidden temporary file beside the target and
renamed over it only when the writer has finished, so an error or an interrupt midway leaves no
half-written file, and an existing file stays as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write to; its file becomes ``path`` once the block completes.

    A symbolic link is followed (the file it points to is replaced, the link kept); a target
    that exists but is not a regular file (/dev/stdout, a FIFO) is handed back as it is and
    written directly. An existing file's permissions are kept. The temporary name does not end
    in the target's suffix: writers that infer a format from the name must be told it.
    """
    if path.exists() and not path.is_file():
        yield path
        return
    target = path.resolve() if path.is_symlink() else path
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        if target.exists():
            shutil.copymode(target, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
