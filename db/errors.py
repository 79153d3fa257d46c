"""The store's exceptions, and the translation of driver errors into them.

Callers (the dispatcher at import, the CLI) catch these four classes and nothing from SQLAlchemy
or the drivers; every message names the problem and the URL, with any password masked.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import exc as sa_exc

from .text import mask_url, printable


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: how an error is reported in one
    line (trial records, warnings, benchmark rows). The whole project uses this one form."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}"[:limit] if line else type(error).__name__


def one_line(error: BaseException | str) -> str:
    """The message of `error` with its whitespace (newlines included) folded into single spaces."""
    return " ".join(str(error).split())


class StoreError(Exception):
    """Base of the store's errors."""


class DatabaseUnavailableError(StoreError):
    """Unreachable server, missing file (with create=False), read-only path, locked database."""


class DatabaseLockedError(DatabaseUnavailableError):
    """Another writer holds the lock (SQLite busy or locked; a PostgreSQL deadlock, serialization
    failure or lock timeout): the transaction was rolled back and may be retried."""


class DatabaseURLError(StoreError, ValueError):
    """A database URL flashtune cannot use: malformed, another backend or driver, in-memory, or a
    path the OS cannot have. A ValueError too, since it is bad input."""


class DatabaseCorruptError(StoreError):
    """Truncated file, not a SQLite file, or flashtune tables missing."""


class SchemaVersionError(StoreError):
    """A schema newer than this code understands, or an older one that needs `flashtune db migrate`."""


# SQLite reports everything as OperationalError/DatabaseError; the message is all there is.
# Connection failures come first: PostgreSQL's "database ... does not exist" is one of them.
_CONNECT_MARKERS = ("connection failed", "connection to server", "could not connect",
                    "connection refused", "server closed the connection")
_CORRUPT_MARKERS = ("file is not a database", "malformed", "no such table", "no such column",
                    "undefinedtable", "undefinedcolumn")
_UNAVAILABLE_MARKERS = ("locked", "unable to open", "readonly", "read-only", "disk i/o",
                        "connection", "could not connect", "timeout", "timed out", "refused",
                        "password authentication", "no such host", "name or service",
                        "permission denied", "database is full", "out of memory", "disk is full")


# SQLite's result codes for "someone else holds the lock", and PostgreSQL's SQLSTATEs for deadlock,
# serialization failure and lock timeout: the statement failed as a whole and can be run again.
_SQLITE_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
_PG_RETRYABLE = ("40P01", "40001", "55P03")


def _is_locked(orig: BaseException) -> bool:
    name = getattr(orig, "sqlite_errorname", None) or ""
    if name.startswith(_SQLITE_BUSY) or getattr(orig, "sqlstate", None) in _PG_RETRYABLE:
        return True
    return "database is locked" in str(orig) or "database table is locked" in str(orig)


def classify(error: BaseException, url: str, doing: str) -> StoreError:
    """The StoreError for a driver/SQLAlchemy error raised while `doing` something with `url`."""
    if isinstance(error, StoreError):
        return error
    orig = getattr(error, "orig", None) or error
    text = f"{type(orig).__name__}: {orig}".strip()
    first_line = printable(text.splitlines()[0] if text else type(error).__name__, 300)
    low = text.lower()
    where = mask_url(url)
    if _is_locked(orig):
        return DatabaseLockedError(f"database {where} is unavailable ({doing}: {first_line})")
    if any(m in low for m in _CONNECT_MARKERS):
        return DatabaseUnavailableError(f"database {where} is unreachable ({doing}: {first_line})")
    if any(m in low for m in _CORRUPT_MARKERS):
        return DatabaseCorruptError(f"database {where} is corrupt or not a flashtune database "
                                    f"({doing}: {first_line})")
    if isinstance(error, sa_exc.InterfaceError) or any(m in low for m in _UNAVAILABLE_MARKERS):
        return DatabaseUnavailableError(f"database {where} is unavailable ({doing}: {first_line})")
    return StoreError(f"database {where}: {doing} failed: {first_line}")


@contextmanager
def translated(url: str, doing: str) -> Iterator[None]:
    """Re-raise SQLAlchemy, driver and OS errors from the block as StoreError subclasses."""
    try:
        yield
    except StoreError:
        raise
    except (sa_exc.SQLAlchemyError, OSError) as error:
        raise classify(error, url, doing) from error
