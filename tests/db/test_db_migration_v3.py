"""Schema 2 -> 3 (the fleet jobs tables, and on to the current schema) on real databases: the schema-2 hold-out database kept under
bench/results, copied and migrated (SQLite), and a PostgreSQL database taken back to schema 2's shape."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from helpers.db import back_to_schema_2, populate
from flashtune.db import schema
from flashtune.db.errors import SchemaVersionError
from flashtune.db.jobs import JobQueue, Worker
from flashtune.db.models import JOB_TABLES
from flashtune.db.store import Store, load_winners, migrate_database
from flashtune.tuner.fleet.units import claim_units

V2 = Path(__file__).resolve().parents[2] / "bench" / "results" / "h200" / "holdout.db"


def _works_as_a_queue(url: str) -> None:
    with Store.open(url, create=False) as store:
        keys = [w.key for w in store.winners()][:4]
        queue = JobQueue(store)
        job, created = queue.create("after-migration", keys[0].arch, "kv", claim_units(keys), lease_s=5, args={},
                                    host="h")
        claim = queue.claim(job, Worker("h", 1, 0))
        assert created and queue.finish_key(claim, claim.keys[0])


def _readable_but_not_writable_at_2(url: str) -> None:
    """Before migrating: apps still read the winners (schema 3 only added tables), the dispatcher's
    import-time read included; a writer and the job queue name the migrate command."""
    with Store.open(url, create=False) as store:
        assert store.schema_version == 2
        winners = store.winners()
        assert winners
        with pytest.raises(SchemaVersionError, match="schema version 2, which has no job tables.*flashtune db migrate"):
            JobQueue(store)
    arch = winners[0].key.arch
    assert {w.key for w in load_winners([arch], url)} == {w.key for w in winners if w.key.arch == arch}
    with pytest.raises(SchemaVersionError, match="schema version 2, older .*flashtune db migrate"):
        Store.open(url)


def test_schema_2_sqlite_database_migrates_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    shutil.copy(V2, path)
    url = f"sqlite:///{path}"
    tables = ("flashtune_runs", "flashtune_trials", "flashtune_winners", "flashtune_recorded")
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM flashtune_meta").fetchone() == ("2",)
        # Schema 2's columns, by name: later versions add key columns (schema 4's features).
        columns = {t: ", ".join(f'"{r[1]}"' for r in raw.execute(f"PRAGMA table_info({t})")) for t in tables}
        before = {t: raw.execute(f"SELECT {columns[t]} FROM {t} ORDER BY id").fetchall() for t in tables}
    assert before["flashtune_winners"]
    _readable_but_not_writable_at_2(url)
    assert migrate_database(url) == (2, schema.SCHEMA_VERSION) == (2, 5)
    with sqlite3.connect(path) as raw:
        after = {t: raw.execute(f"SELECT {columns[t]} FROM {t} ORDER BY id").fetchall() for t in tables}
        names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert after == before and set(JOB_TABLES) <= names
    assert migrate_database(url) == (5, 5)  # nothing more to do
    _works_as_a_queue(url)


@pytest.mark.postgres
def test_postgres_schema_2_database_migrates(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        populate(store)
        before = store.winners(), store.trials()
    back_to_schema_2(pg_url)
    _readable_but_not_writable_at_2(pg_url)
    assert migrate_database(pg_url) == (2, 5)
    with Store.open(pg_url, create=False) as store:
        assert (store.winners(), store.trials()) == before
    _works_as_a_queue(pg_url)
