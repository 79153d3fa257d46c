"""Where the database lives by default, which URLs are usable, and how URLs are shown to people.

A usable URL is a SQLite file (`sqlite:///PATH`, or the `sqlite:///file:PATH?...&uri=true` form)
or a PostgreSQL database through psycopg 3 (`postgresql+psycopg://...`; plain `postgresql://`
means the same). Everything else is refused up front by `check_url`, with one line naming the URL
(password masked) and what is accepted: another backend or driver, in-memory SQLite (the data
would vanish when the process ends), a SQLite URL with a host, and paths the OS cannot have
(a NUL byte, `~user` for a user that does not exist, longer than PATH_MAX or NAME_MAX).
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import DatabaseURLError
from .text import mask_url, printable

ENV_VAR = "FLASHTUNE_DB"
DB_FILENAME = "flashtune.db"
ACCEPTED = ("expected sqlite:///PATH (a file) or "
            "postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
_DRIVERS = {"sqlite": ("sqlite", "sqlite+pysqlite"),
            "postgresql": ("postgresql+psycopg", "postgresql")}


def default_sqlite_path() -> Path:
    """The per-user SQLite file: `<user data dir>/flashtune/flashtune.db` (platformdirs)."""
    return Path(platformdirs.user_data_dir("flashtune", appauthor=False)) / DB_FILENAME


def default_url() -> str:
    """`$FLASHTUNE_DB` when set and not empty, else the per-user SQLite file's URL."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    return f"sqlite:///{default_sqlite_path()}"


def _refuse(url: str, why: str) -> DatabaseURLError:
    return DatabaseURLError(f"unsupported database URL '{mask_url(url)}': {why}; {ACCEPTED}")


def parse_url(url: str) -> URL:
    """Parse a database URL's syntax; DatabaseURLError (a ValueError) naming the URL and the
    accepted forms. `check_url` checks that the URL is also usable."""
    try:
        return make_url(str(url))
    except (ArgumentError, ValueError, TypeError) as exc:
        raise DatabaseURLError(f"malformed database URL '{mask_url(url)}': {ACCEPTED} "
                               f"({printable(exc, 200)})") from None


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError, AttributeError):
        return default


def _sqlite_file(url: str, parsed: URL) -> tuple[Path, bool]:
    """The file a SQLite URL names, and whether it is the `file:` URI form; refuses the rest."""
    if parsed.host or parsed.username or parsed.password or parsed.port:
        raise _refuse(url, "a SQLite URL names a file, not a host (use three slashes: sqlite:///PATH)")
    database = parsed.database or ""
    uri = database.startswith("file:")
    if uri:
        database = database[len("file:"):].split("?", 1)[0]
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise _refuse(url, "an in-memory SQLite database would vanish when the command ends, "
                           "with everything written to it")
    if "\x00" in database:
        raise _refuse(url, "the path holds a NUL character")
    if database.startswith("~"):
        expanded = os.path.expanduser(database)
        if expanded.startswith("~"):
            user = database[1:].split("/", 1)[0]
            raise _refuse(url, f"there is no user '{printable(user, 64)}' for the path's ~{printable(user, 64)}")
        database = expanded
    encoded = os.fsencode(database)
    path_max, name_max = _limit("PC_PATH_MAX", 4096), _limit("PC_NAME_MAX", 255)
    if len(encoded) >= path_max:
        raise _refuse(url, f"the path is {len(encoded)} bytes, longer than the OS limit of {path_max - 1}")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > name_max:
        raise _refuse(url, f"a name in the path is {longest} bytes, longer than the OS limit of {name_max}")
    return Path(database), uri


def check_url(url: str) -> URL:
    """The URL, parsed and checked usable (see the module doc), with a SQLite `~` expanded and
    plain `postgresql://` pointed at psycopg; DatabaseURLError (a ValueError and a StoreError)
    naming the URL, the problem and the accepted forms otherwise."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if parsed.drivername not in _DRIVERS.get(backend, ()):
        known = backend in _DRIVERS
        raise _refuse(url, f"the driver '{printable(parsed.drivername, 40)}' is not supported" if known
                      else f"'{printable(backend, 40)}' databases are not supported")
    if backend == "postgresql":
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise _refuse(url, f"port {parsed.port} is not from 1 to 65535")
        return parsed.set(drivername="postgresql+psycopg")
    path, uri = _sqlite_file(url, parsed)
    return parsed if uri else parsed.set(database=str(path))


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (with `~` expanded); None for PostgreSQL. DatabaseURLError for
    a URL `check_url` refuses, in-memory SQLite included."""
    parsed = check_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return _sqlite_file(url, parsed)[0]
