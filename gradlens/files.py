"""Reading and writing the user's files: whole or not at all, and every failure in words.

Every file gradlens writes (``dump --output``, ``sweep --output``, ``sweep --plot``) goes
through the same two steps:

1. `check_output`, before any work: the path must not be a directory, and the nearest folder
   that exists on the way to it must be a directory where a file can be created (tried, with
   an unnamed temporary file). An output that cannot be written is refused before a batch is
   built or a sweep computed.
2. `writing`, once the content is ready: missing parent directories are created (in every
   command alike), the content goes to a hidden temporary file beside the target, and that file
   is renamed over the target only when the writer has finished. An error or an interrupt midway
   leaves no half-written file, an existing file stays as it was, and directories created for
   the file are removed again.

A file gradlens reads as text (a YAML config, a ``.jsonl`` batch) goes through `read_text`.
Either way, an `OSError` (a read-only directory, a full disk, a missing or unreadable file) or a
`UnicodeError` is the user's to fix, not a bug: it becomes a `GradlensError` naming the option
or key, the path and the reason, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from gradlens.errors import GradlensError
from gradlens.memory import human


def os_reason(exc: OSError) -> str:
    """'Permission denied' — the reason of an OSError in words, without the errno noise."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {
        errno.ENOSPC: " (the disk is full)",
        errno.EROFS: " (a read-only file system)",
        errno.EACCES: " (no permission to write or read here)",
    }.get(exc.errno or 0, "")
    return reason + hint


def decode_reason(exc: UnicodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} cannot be "
            "decoded; save the file as UTF-8"
        )
    return f"cannot be encoded: {exc}"


def read_text(path: Path, what: str, limit: tuple[int, str] | None = None) -> str:
    """The file's text (UTF-8, line ends as Python's text mode reads them); a `GradlensError`
    naming ``what`` and the path otherwise.

    ``limit``: (the most bytes the file may hold, why, for the message). A regular file's size
    is checked before anything is read; anything else (a pipe, a device such as /dev/zero,
    which never ends) is read to at most ``limit + 1`` bytes, so that an endless or huge input
    is refused before it fills the memory.
    """
    where = f"{what} {str(path)!r}"
    try:
        with path.open("rb") as fh:
            if limit is None:
                data = fh.read()
            else:
                most, why = limit
                info = os.fstat(fh.fileno())
                if stat.S_ISREG(info.st_mode) and info.st_size > most:
                    raise GradlensError(
                        f"{where}: {human(info.st_size)}, more than the {human(most)} allowed "
                        f"({why})"
                    )
                data = fh.read(most + 1)
                if len(data) > most:
                    raise GradlensError(f"{where}: longer than the {human(most)} allowed ({why})")
        text = data.decode("utf-8")
    except OSError as exc:
        raise GradlensError(f"{where}: {os_reason(exc)}") from None
    except UnicodeError as exc:
        raise GradlensError(f"{where}: {decode_reason(exc)}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode's newline=None


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its ancestors that exists (the current directory at worst)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path.cwd()


def check_output(path: Path, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written (see the module text).

    A target that exists but is not a regular file or a directory (/dev/stdout, a FIFO) is
    accepted: it is written directly.
    """
    where = f"{option} {str(path)!r}"
    try:
        _check_output(path, where)
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise GradlensError(f"{where}: {os_reason(exc)}") from None


def _check_output(path: Path, where: str) -> None:
    if path.is_dir():
        raise GradlensError(f"{where}: is a directory; give a file name")
    if path.exists() and not path.is_file():
        return
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise GradlensError(
            f"{where}: {str(folder)!r} is a file, so no directory can be created under it"
        )
    try:  # asked of the kernel: permission bits do not tell about /proc or a read-only mount
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise GradlensError(
            f"{where}: no file can be created in {str(folder)!r}: {os_reason(exc)}"
        ) from None


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, two options that would write one file (the second would
    replace the first): ``outputs`` maps each option to its path, None where not given."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(os.path.realpath(path))
        if key in seen:
            raise GradlensError(
                f"{seen[key]} and {option} both name {str(path)!r}; the second would replace "
                "the first: give each its own file"
            )
        seen[key] = option


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, outermost first."""
    missing = []
    for parent in path.absolute().parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing[::-1]


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


@contextmanager
def writing(path: Path, option: str, mode: str = "w") -> Iterator[IO[Any]]:
    """``path`` opened for writing (``mode`` 'w': UTF-8 text, 'wb': bytes), replaced whole.

    Missing parent directories are created; on any failure they are removed again and no
    temporary file is left. OS and encoding errors become a `GradlensError` naming ``option``.
    """
    created: list[Path] = []
    try:
        try:
            for parent in _missing_parents(path):
                parent.mkdir()
                created.append(parent)
            with replacing(path) as target:
                text = "b" not in mode
                encoding = "utf-8" if text else None
                newline = "" if text else None
                with open(target, mode, encoding=encoding, newline=newline) as handle:
                    yield handle
        except OSError as exc:
            raise GradlensError(f"{option} {str(path)!r}: {os_reason(exc)}") from None
        except UnicodeError as exc:
            raise GradlensError(f"{option} {str(path)!r}: {decode_reason(exc)}") from None
    except BaseException:
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break
        raise
