"""Files the commands write (`export -o`, `bench --csv`): only over a regular file or where none is.

A target given on the command line can name a device node (`/dev/null`, `/dev/stdout`), a FIFO or
a directory; replacing one of those with a regular file would break the system (as root, /dev/null
itself) or hang. So the target is checked first and refused with one line, untouched, unless it is
missing or a regular file. A symlink is followed: the file it points to is written (replaced), and
the link stays a link. `-` means stdout.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import IO

from .common import CliError

STDOUT = "-"


def _umask() -> int:
    # There is no read-only query of the umask: set it and put it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(path: str | os.PathLike[str], option: str) -> Path:
    """The file to write for `path` (symlinks followed): CliError naming `option` when it is a
    directory, FIFO, device or socket, or its directory is missing."""
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        if not real.parent.is_dir():
            raise CliError(f"cannot write {option} {path}: no directory {real.parent}") from None
        return real
    except OSError as error:
        raise CliError(f"cannot write {option} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise CliError(f"{option} {path}: it is {kind}; refusing to replace it (give a file path, or - for stdout)")
    return real


def write_atomically(path: str | os.PathLike[str], text: str, option: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename it over
    the target, so a half-written file never replaces a good one.

    A new file gets the mode the umask allows (0666 & ~umask); a replaced file keeps its mode.
    """
    real = check_target(path, option)
    try:
        mode = real.stat().st_mode & 0o7777 if real.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, mode)  # mkstemp creates 0600
            os.replace(tmp, real)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise CliError(f"cannot write {option} {path}: {error.strerror or error}") from None


def open_for_writing(path: str | os.PathLike[str], option: str) -> IO[str]:
    """`path` opened for writing text as it is produced (e.g. CSV rows as each shape finishes), after
    the same check as `write_atomically`."""
    real = check_target(path, option)
    try:
        return open(real, "w", newline="", encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot write {option} {path}: {error.strerror or error}") from None
