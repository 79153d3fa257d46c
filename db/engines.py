"""SQLAlchemy engines for the store's two backends, set up as the store needs them.

SQLite: a file only (`paths.check_url` refuses in-memory URLs), checked to be a regular file
with a SQLite header before SQLite opens it (a FIFO would block the open forever, junk would be
reported only at the first query); WAL mode, a busy timeout, and write transactions that begin
IMMEDIATE so that writers queue for the lock instead of failing on a stale snapshot.
PostgreSQL: psycopg 3 with a connect timeout, and a timestamp loader that hands a stored value
Python cannot hold ('infinity', a year past 9999) to the row decoder instead of failing the query.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL

from .errors import DatabaseCorruptError, DatabaseUnavailableError
from .files import UnreadableFileError, read_file_head
from .paths import check_url, sqlite_path
from .text import mask_url
from .text import printable

PG_CONNECT_TIMEOUT_S = 5
# Execution options of a connection that writes: its transaction begins IMMEDIATE on SQLite.
WRITE_OPTIONS: dict[str, Any] = {"flashtune_write": True}
_SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path, url: str) -> None:
    # SQLite would happily treat a 0-byte file as empty, and reports other junk only at the
    # first query; checking the header up front gives one clear message and writes nothing.
    # The read never blocks and refuses a FIFO, device or directory by its open descriptor.
    try:
        head = read_file_head(path, len(_SQLITE_HEADER), what="database file")
    except UnreadableFileError as exc:
        raise DatabaseUnavailableError(f"database {mask_url(url)}: {exc}") from None
    if head and head != _SQLITE_HEADER:
        raise DatabaseCorruptError(f"database {mask_url(url)}: {printable(path)} is not a SQLite file "
                                   f"(its first bytes are {head[:8]!r})")


def _sqlite_engine(url: str, parsed: URL, path: Path, create: bool, timeout_s: float) -> Engine:
    try:
        exists = path.exists()
    except OSError as exc:
        raise DatabaseUnavailableError(f"database {mask_url(url)}: cannot look at {printable(path)}: "
                                       f"{exc.strerror or exc}") from None
    if exists:
        _check_sqlite_file(path, url)
    elif not create:
        raise DatabaseUnavailableError(f"database {mask_url(url)}: no file at {printable(path)} "
                                       f"(nothing is tuned yet, or FLASHTUNE_DB points elsewhere)")
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailableError(f"database {mask_url(url)}: cannot create directory "
                                           f"{printable(path.parent)}: {exc.strerror or exc}") from None
    # A pooled connection stays open between writes: closing the last connection of a WAL
    # database checkpoints and deletes the WAL, which would make every commit cost an fsync.
    engine = create_engine(parsed, connect_args={"timeout": timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL with NORMAL sync: a commit survives the process being killed (not a power cut),
        # and costs no fsync, which keeps one-commit-per-trial fast.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # VACUUM and friends must run outside a transaction
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("flashtune_write") else "BEGIN")

    return engine


def _tolerant_timestamp_loader() -> type:
    from psycopg import DataError
    from psycopg.types.datetime import TimestamptzLoader

    class Loader(TimestamptzLoader):  # type: ignore[misc]
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except DataError:  # beyond datetime's range: the row decoder reports the text
                return bytes(data).decode("utf-8", "replace")
    return Loader


def _pg_engine(url: str, parsed: URL) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        loader = _tolerant_timestamp_loader()
    except ImportError as exc:  # the DBAPI driver is loaded here, not at import of db
        raise DatabaseUnavailableError(
            f"database {mask_url(url)}: its driver is not installed ({exc.name or exc}); "
            "install PostgreSQL support with: pip install 'psycopg[binary]' (from a flashtune checkout: "
            "pip install '.[postgres]')") from None

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.adapters.register_loader("timestamptz", loader)

    return engine


def make_engine(url: str, create: bool, timeout_s: float) -> Engine:
    """An engine for `url` (checked by `paths.check_url`: DatabaseURLError if unusable). With
    `create`, a missing SQLite file's directory is made; without it a missing file is
    DatabaseUnavailableError."""
    parsed = check_url(url)
    path = sqlite_path(url)
    if path is not None:
        return _sqlite_engine(url, parsed, path, create, timeout_s)
    return _pg_engine(url, parsed)


def use_wal(engine: Engine) -> None:
    """Put a SQLite database in WAL mode (persistent in the file). Only writers call it, once the
    file is known to be a flashtune database: readers and refused files are left as they were."""
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
