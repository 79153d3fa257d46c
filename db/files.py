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


class UnreadableFileError(ValueError):
    """A file a command cannot read: missing, not a regular file, too large, or an OS error."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, *, what: str = "file") -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes` of them.

    UnreadableFileError naming the path and the problem for a missing file, a directory, FIFO,
    device or socket, a file over `max_bytes`, or any OS error. Never blocks on a FIFO.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(f"cannot read {what} {path}: it is {_kind(info.st_mode)}, "
                                      "not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFileError(f"{what} {path} is {info.st_size} bytes, larger than the "
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
        raise UnreadableFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew while being read
        raise UnreadableFileError(f"{what} {path} grew past the {max_bytes}-byte limit while it was read")
    return b"".join(chunks)


def is_regular_or_missing(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is absent or a regular file (following symlinks): safe to open as a database
    file or to replace by rename."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False
