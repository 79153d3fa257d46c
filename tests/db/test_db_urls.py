"""Database URLs flashtune cannot use: one line naming the URL (password masked) and what is accepted.

Every reader of a URL is checked: `Store.open` (reading and writing), `migrate_database`,
`load_winners`, `paths.sqlite_path`, and `paths.mask_url`, which must never raise.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from flashtune.db.errors import DatabaseURLError, StoreError
from flashtune.db.paths import check_url, sqlite_path
from flashtune.db.text import mask_url
from flashtune.db.store import Store, load_winners, migrate_database

LONG = "a" * 5000
UNUSABLE = {
    "garbage": ("not a url at all", "malformed database URL"),
    "empty": ("", "malformed database URL"),
    "mysql": ("mysql://flashtune:s3cret@db.example/flashtune", "'mysql' databases are not supported"),
    "http": ("http://example.com/flashtune.db", "'http' databases are not supported"),
    "file scheme": ("file:", "malformed database URL"),
    "file path": ("file:///tmp/flashtune.db", "'file' databases are not supported"),
    "unknown driver": ("postgresql+foo://flashtune:s3cret@db.example/flashtune", "driver 'postgresql+foo'"),
    "other postgres driver": ("postgresql+asyncpg://u:s3cret@h/d", "driver 'postgresql+asyncpg'"),
    "sqlcipher": ("sqlite+pysqlcipher://:s3cret@/secret.db", "driver 'sqlite+pysqlcipher'"),
    "no such user": ("sqlite:///~nosuchuser-flashtune/x.db", "no user 'nosuchuser-flashtune'"),
    "path too long": (f"sqlite:////tmp/{LONG}/x.db", "longer than the OS limit"),
    "name too long": (f"sqlite:////tmp/{'b' * 300}.db", "longer than the OS limit"),
    "NUL in path": ("sqlite:////tmp/a\x00b.db", "NUL"),
    "stray colon in port": ("postgresql+psycopg://u:s3cret@host:54x32/db", "malformed database URL"),
    "port out of range": ("postgresql+psycopg://u:s3cret@host:99999/db", "port 99999"),
    "sqlite with a host": ("sqlite://tmp/flashtune.db", "not a host"),
    "sqlite with a user": ("sqlite://u:s3cret@/x.db", "not a host"),
    "in memory": ("sqlite://", "would vanish"),
    "in memory by name": ("sqlite:///:memory:", "would vanish"),
    "in memory URI": ("sqlite:///file::memory:?uri=true", "would vanish"),
    "in memory mode": ("sqlite:///file:x.db?mode=memory&uri=true", "would vanish"),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_url_is_one_line_everywhere(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, needle = UNUSABLE[case]
    monkeypatch.chdir(tmp_path)  # nothing may be created, not even relative to here
    calls = {"open for writing": lambda: Store.open(url), "open for reading": lambda: Store.open(url, create=False),
             "migrate": lambda: migrate_database(url), "load_winners": lambda: load_winners(["sm_90"], url),
             "sqlite_path": lambda: sqlite_path(url), "check_url": lambda: check_url(url)}
    for name, call in calls.items():
        with pytest.raises(DatabaseURLError) as info:
            call()
        message = str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError), name
        assert needle in message, (name, message)
        assert "\n" not in message and "\x00" not in message and "s3cret" not in message, name
        assert "expected sqlite:///PATH" in message and len(message) < 800, name
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", [u for u, _ in UNUSABLE.values()] + ["postgresql://u:s3cret@h:1x/d\n\x1b[2J"])
def test_mask_url_never_raises_and_hides_the_password(url: str) -> None:
    masked = mask_url(url)
    assert "s3cret" not in masked and "\n" not in masked and "\x1b" not in masked and len(masked) < 250


def test_usable_urls() -> None:
    assert str(sqlite_path("sqlite:///rel/x.db")) == "rel/x.db"
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:///file:/abs/x.db?mode=ro&uri=true") == Path("/abs/x.db")
    assert sqlite_path("postgresql+psycopg://u@h/d") is None
    # Plain postgresql:// means psycopg 3, the driver the postgres extra installs.
    assert check_url("postgresql://u:p@h:5432/d").drivername == "postgresql+psycopg"
    assert mask_url("postgresql+psycopg://u:s3cret@h/d") == "postgresql+psycopg://u:***@h/d"


def test_existing_user_tilde_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sqlite_path("sqlite:///~/x.db") == tmp_path / "x.db"
