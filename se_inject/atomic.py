"""Atomic file writes: a failed write leaves an existing file as it was and no partial file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import OutputPathError, SEInjectError

__all__ = ["atomic_write"]


def atomic_write(file: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file in ``file``'s folder, then move it into place.

    The data is flushed to disk before ``os.replace``; the new file gets the mode a plain
    ``open()`` would give it (``mkstemp`` creates 0600).

    Raises:
        OutputPathError: the file cannot be written; an existing ``file`` is left untouched and
            no temporary file remains.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    except OSError as e:
        raise OutputPathError(f"cannot write {str(file)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(file))
        os.replace(tmp, file)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, SEInjectError):
            raise OutputPathError(f"cannot write {str(file)!r}: {e.strerror or e}") from e
        raise
    return file


def _new_file_mode(existing: Path) -> int:
    try:
        return existing.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
