"""Where the database lives by default, and how URLs are shown to people."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_VAR = "FLASHTUNE_DB"
DB_FILENAME = "flashtune.db"


def default_sqlite_path() -> Path:
    """The per-user SQLite file: `<user data dir>/flashtune/flashtune.db` (platformdirs)."""
    return Path(platformdirs.user_data_dir("flashtune", appauthor=False)) / DB_FILENAME


def default_url() -> str:
    """`$FLASHTUNE_DB` when set and not empty, else the per-user SQLite file's URL."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    return f"sqlite:///{default_sqlite_path()}"


def parse_url(url: str) -> URL:
    """Parse a database URL; ValueError naming the URL and the accepted forms."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"malformed database URL {url!r}: expected sqlite:///PATH or "
                         f"postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DBNAME ({exc})") from None


def mask_url(url: str) -> str:
    """The URL with any password replaced by '***', fit for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url if "@" not in url else "<unparseable URL>"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL; None for in-memory SQLite and for other backends."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    if database.startswith("file:"):
        database = database[len("file:"):].split("?", 1)[0]
    return Path(database).expanduser()
