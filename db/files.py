"""Reading the files that commands are handed (exchange files, benchmark CSVs) safely.

A path given on a command line can name anything: a FIFO (reading blocks forever), a device such as
/dev/zero (reading never ends), a directory, or a file that grows while it is read. Every such read
goes through `read_regular_file`, which opens without blocking, refuses anything but a regular file
by looking at the open descriptor (so a file swapped after the check is still the one checked), and
bounds the bytes read by the size limit whatever the file does meanwhile.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .text import printable


class UnreadableFileError(ValueError):
    """A file a command cannot read: missing, not a regular file, too large, or an OS error."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _unreadable(what: str, path: Path, exc: Exception) -> UnreadableFileError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return UnreadableFileError(f"cannot read {what} {printable(path)}: {reason}")


def _open_regular(path: Path, what: str) -> tuple[int, os.stat_result]:
    """An fd open for reading on the regular file at `path`, and its stat; never blocks."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise _unreadable(what, path, exc) from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _unreadable(what, path, exc) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnreadableFileError(f"cannot read {what} {printable(path)}: it is {_kind(info.st_mode)}, "
                                  "not a regular file")
    return fd, info


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, *, what: str = "file") -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes` of them.

    UnreadableFileError naming the path and the problem for a missing file, a directory, FIFO,
    device or socket, a file over `max_bytes`, or any OS error. Never blocks on a FIFO.
    """
    path = Path(path)
    fd, info = _open_regular(path, what)
    try:
        if info.st_size > max_bytes:
            raise UnreadableFileError(f"{what} {printable(path)} is {info.st_size} bytes, larger than the "
                                      f"{max_bytes}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise _unreadable(what, path, exc) from None
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew while being read
        raise UnreadableFileError(f"{what} {printable(path)} grew past the {max_bytes}-byte limit while it was read")
    return b"".join(chunks)


def read_file_head(path: str | os.PathLike[str], size: int, *, what: str = "file") -> bytes:
    """The first `size` bytes (fewer if the file is shorter) of the regular file at `path`, for
    a format check such as SQLite's header; UnreadableFileError as `read_regular_file` gives."""
    path = Path(path)
    fd, _ = _open_regular(path, what)
    try:
        return os.read(fd, size)
    except OSError as exc:
        raise _unreadable(what, path, exc) from None
    finally:
        os.close(fd)


def is_regular_or_missing(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is absent or a regular file (following symlinks): safe to open as a database
    file or to replace by rename."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False
