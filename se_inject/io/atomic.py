"""Atomic file writes: a failed or interrupted write leaves an existing file as it was and no
partial file.

Torch's zip writer turns an ``OSError`` (disk full, file-size limit) or a Ctrl-C raised inside it
into a ``RuntimeError``; so the handle given to the writer records the ``OSError`` its ``write``
met, and a SIGINT / SIGTERM handler records the interrupt, and the cause is reported, not the
wrapping. SIGTERM (what ``timeout``, ``kill`` and job schedulers send) is treated as Ctrl-C and
raised as :class:`Terminated`.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import OutputPathError, SEInjectError

__all__ = ["Terminated", "atomic_write", "output_target", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a job scheduler) arrived: handled as Ctrl-C is (an
    interrupted write leaves the old file as it was and no temporary file); the command exits
    143. A ``KeyboardInterrupt``, not an error of se-inject's: it stops the program."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the body (the main thread only), as SIGINT raises
    ``KeyboardInterrupt``; the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

_NOT_REGULAR = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def output_target(path: str | os.PathLike[str]) -> Path:
    """The regular file a write to ``path`` replaces: ``path`` itself, or a symlink's target.

    Raises:
        OutputPathError: ``path`` is (or links to) a device, FIFO or socket, which a write must
            never replace, or a folder.
    """
    _check_name_lengths(Path(path))
    file = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        return file  # nothing there yet: a new regular file
    except OSError as e:
        if e.errno == errno.ELOOP:  # (realpath gives up on a loop and returns the link itself)
            raise OutputPathError(
                f"cannot write {os.fspath(path)!r}: it is a symbolic link loop; give a file name such as model.pt"
            ) from None
        raise OutputPathError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from None
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise OutputPathError(
                f"cannot write {os.fspath(path)!r}: it is {kind}, not a regular file; give a file name such as model.pt"
            )
    if stat.S_ISDIR(mode):
        raise OutputPathError(f"cannot write {os.fspath(path)!r}: it is a directory; give a file name such as model.pt")
    return file


#: Longest file name (one path component, in bytes) where the system does not say: Linux, macOS, Windows.
_NAME_MAX = 255


def _check_name_lengths(path: Path) -> None:
    """Each part of ``path`` fits the file system's name limit (the OS would refuse it deep in a write)."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > _NAME_MAX:
            which = "its name" if Path(part) == path else f"the name {_short(Path(part))}"
            raise OutputPathError(
                f"cannot write {_short(path)}: {which} is {size} bytes, longer than the {_NAME_MAX} a file name may have"
            )


def _short(path: Path) -> str:
    """``path`` quoted, cut in the middle when long, so the error stays one readable line."""
    text = os.fspath(path)
    return repr(text) if len(text) <= 80 else repr(f"{text[:40]}...{text[-30:]}")


class _RecordingHandle:
    """A binary file handle that remembers the ``OSError`` its writes raised."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class _Interrupts:
    """SIGINT or SIGTERM while writing: ``seen`` is the signal, and the interrupt is raised
    (``defer=False``) or held until the end of the block (``defer=True``, for the move into place)."""

    def __init__(self) -> None:
        self.seen: int | None = None
        self.defer = False

    def interrupt(self, message: str, error: BaseException | None = None) -> KeyboardInterrupt:
        """The interrupt to raise: :class:`Terminated` for SIGTERM, else ``KeyboardInterrupt``."""
        terminated = self.seen == signal.SIGTERM or isinstance(error, Terminated)
        return (Terminated if terminated else KeyboardInterrupt)(message)

    @contextmanager
    def watching(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set in the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            self.seen = self.seen or signum
            if not self.defer:
                raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, before in previous.items():
                signal.signal(sig, before)


def atomic_write(file: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``file``'s target, then move it into place.

    ``file`` may be a symlink: its target is replaced and the link kept. The data is flushed to
    disk before ``os.replace``; the new file gets the mode a plain ``open()`` would give it
    (``mkstemp`` creates 0600).

    Raises:
        OutputPathError: the file cannot be written (also disk full midway); an existing file
            is left untouched and no temporary file remains.
        KeyboardInterrupt: Ctrl-C during the write, with a message that says the existing file
            is unchanged.
        Terminated: SIGTERM during the write (a ``KeyboardInterrupt``, the same message).
    """
    target = output_target(file)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputPathError(f"cannot write {str(file)!r}: {e.strerror or e}") from e
    interrupts = _Interrupts()
    recorder: _RecordingHandle | None = None
    try:
        with interrupts.watching():
            with os.fdopen(fd, "wb") as handle:
                recorder = _RecordingHandle(handle)
                write(recorder)  # type: ignore[arg-type]
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, _new_file_mode(target))
            interrupts.defer = True
            os.replace(tmp, target)
    except BaseException as e:
        _remove(tmp)
        if interrupts.seen or isinstance(e, KeyboardInterrupt):
            raise interrupts.interrupt(f"writing {str(file)!r} stopped: the existing file is unchanged", e) from None
        if isinstance(e, SEInjectError):
            raise
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError):
            raise OutputPathError(f"cannot write {str(file)!r}: {cause.strerror or cause}") from e
        raise
    if interrupts.seen:  # Ctrl-C while moving the finished file into place: it is written
        raise interrupts.interrupt(f"interrupted after {str(file)!r} was written")
    return file


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _new_file_mode(existing: Path) -> int:
    try:
        return existing.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
