"""`flashtune db migrate` on a database whose rows name rows deleted by hand (sqlite3 runs with foreign keys
off): refused naming the rows, the database unchanged; `--repair` clears them and migrates.

SQLite: the schema-1 H200 database (its winners' trials deleted), whose 1 -> 2 step copies the winners table
and so meets the foreign key. PostgreSQL: a database taken back to schema 2, a trial deleted with the
foreign-key triggers off.
"""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from flashtune.db.schema import SCHEMA_VERSION
from flashtune.db.store import Store
from flashtune.tuner.cli import main

from helpers.cli import assert_usage_error
from helpers.db import back_to_schema_2, execute_raw, file_digest, populate, raw_snapshot

SCHEMA1_DB = Path(__file__).resolve().parents[2] / "bench" / "results" / "h200" / "tune_h200.db"


def _migrate(url: str, *extra: str) -> Result:
    return CliRunner().invoke(main, ["db", "migrate", "--db", url, *extra])


def _winner_trials(url: str) -> list[int | None]:
    with Store.open(url, create=False) as store:
        return [w.trial_id for w in store.winners()]


def test_sqlite_schema_1_with_deleted_trials_is_refused_then_repaired(tmp_path: Path) -> None:
    path = tmp_path / "schema1.db"
    shutil.copy(SCHEMA1_DB, path)
    url = f"sqlite:///{path}"
    with sqlite3.connect(path) as raw:  # foreign keys off, as in the sqlite3 shell
        raw.execute("DELETE FROM flashtune_trials WHERE id IN "
                    "(SELECT trial_id FROM flashtune_winners WHERE id IN (1, 2))")
    before = file_digest(path)
    assert_usage_error(_migrate(url), "flashtune_winners row(s) 1, 2: trial_id names a missing flashtune_trials row",
                       "nothing migrated", "flashtune db migrate --repair")
    assert file_digest(path) == before
    repaired = _migrate(url, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert repaired.stdout.splitlines() == [
        "repaired: cleared trial_id of 2 flashtune_winners row(s) whose flashtune_trials row is missing",
        f"migrated {url} from schema version 1 to {SCHEMA_VERSION}"]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT id FROM flashtune_winners WHERE trial_id IS NULL").fetchall() == [(1,), (2,)]
        assert raw.execute("SELECT count(*) FROM flashtune_winners").fetchone() == (48,)
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.postgres
def test_postgres_schema_2_with_a_deleted_trial_is_refused_then_repaired(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        populate(store)
    back_to_schema_2(pg_url)
    execute_raw(pg_url, "SET LOCAL session_replication_role = replica; DELETE FROM flashtune_trials WHERE id = "
                        "(SELECT trial_id FROM flashtune_winners ORDER BY id LIMIT 1)")
    with create_engine(pg_url).connect() as conn:
        orphan = conn.execute(text("SELECT min(id) FROM flashtune_winners")).scalar_one()
    before = raw_snapshot(pg_url)
    assert_usage_error(_migrate(pg_url), f"flashtune_winners row(s) {orphan}: trial_id names a missing "
                                         "flashtune_trials row", "flashtune db migrate --repair")
    assert raw_snapshot(pg_url) == before
    repaired = _migrate(pg_url, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert repaired.stdout.startswith("repaired: cleared trial_id of 1 flashtune_winners row(s)")
    assert f"from schema version 2 to {SCHEMA_VERSION}" in repaired.stdout
    trials = _winner_trials(pg_url)
    assert len(trials) == 12 and trials.count(None) == 1
