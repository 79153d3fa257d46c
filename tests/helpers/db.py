"""Shared fixtures and helpers of the db tests (imported by tests/test_db*.py).

`db_url` runs a test on a fresh SQLite file and, when FLASHTUNE_TEST_PG_URL is set, on the real
PostgreSQL server too, isolated in a schema of its own that is dropped afterwards.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key

PG_ENV = "FLASHTUNE_TEST_PG_URL"
PG_SKIP_REASON = f"{PG_ENV} is not set (CI sets it to the PostgreSQL server at 127.0.0.1:5432)"

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def pg_schema_url(base: str, schema: str) -> str:
    """`base` with every connection's search_path set to `schema`."""
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _pg_admin(base: str, statement: str) -> None:
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose connections live in a fresh schema; skipped without the server."""
    base = pg_base_url()
    if base is None:
        pytest.skip(PG_SKIP_REASON)
    schema = f"flashtune_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(base, f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(base, schema)
    finally:
        _pg_admin(base, f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL: a SQLite file under tmp_path, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flashtune.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'flashtune.db'}"


def run_info(gpu_name: str = "NVIDIA H200", arch: str = "sm_90", kernel_version: str = "k1",
             host: str = "node-1") -> RunInfo:
    return RunInfo(gpu_name=gpu_name, arch=arch, sm_count=132, smem_limit=232448, driver="560.35",
                   cuda="12.6", triton_version="3.6.0", torch_version="2.11.0",
                   kernel_version=kernel_version, host=host, args={"seq": [128, 256], "budget": 60.0})


def key(n: int = 1024, d: int = 64, dtype: str = "float16", causal: bool = True,
        arch: str = "sm_90", n_kv: int = 0) -> Key:
    return Key(arch, "fwd", n, d, dtype, causal, n_kv)


CFG_A = Config(128, 64, 4, 3)
CFG_B = Config(64, 64, 4, 2, (("tma", True),))
CFG_C = Config(64, 32, 2, 1)


def populate(store: Store, *, arch: str = "sm_90", gpu_name: str = "NVIDIA H200",
             kernel_version: str = "k1", scale: float = 1.0) -> int:
    """Tune a small grid into `store` (two configs per key, the faster wins); the run id."""
    run = store.start_run(run_info(gpu_name=gpu_name, arch=arch, kernel_version=kernel_version))
    for n in (128, 512, 2048):
        for d in (64, 128):
            for causal in (False, True):
                k = key(n, d, causal=causal, arch=arch)
                for cfg, factor in ((CFG_A, 1.0), (CFG_B, 0.8)):
                    ms = scale * factor * n * d / 1e5
                    trial = store.record_trial(run, k, cfg, "ok", median_ms=ms, tflops=100 / ms,
                                               compile_s=0.5)
                    store.offer_winner(trial)
                store.record_trial(run, k, CFG_C, "out_of_resources", error="OutOfResources: shared memory")
    store.finish_run(run)
    return run


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(url: str) -> tuple[list, list, dict]:
    """Everything a test compares for 'row-for-row unchanged': winners, trials, counts."""
    with Store.open(url, create=False) as store:
        return store.winners(), store.trials(), store.counts()


def aware(year: int = 2025, month: int = 1, day: int = 1, hours: int = 0) -> datetime:
    return datetime(year, month, day, tzinfo=timezone.utc) + timedelta(hours=hours)


def execute_raw(url: str, statement: str, params: dict | None = None) -> None:
    """Run SQL on the database behind `url` without the store (to damage rows as another program
    would): sqlite3 itself for SQLite, so that no column type converts the value written."""
    if url.startswith("sqlite"):
        raw = sqlite3.connect(make_url(url).database)
        try:
            raw.execute(statement, params or {})
            raw.commit()
        finally:
            raw.close()
        return
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params or {})
    finally:
        engine.dispose()


def finishes_within(seconds: float, work: Callable[[], Any], *, unblock: Path | None = None) -> Any:
    """`work()`'s result (or exception) when it returns within `seconds`; else the test fails, and
    the FIFO `unblock` is opened for writing so that a reader stuck on it can end."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"still running after {seconds} s (it hangs)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A named pipe with no writer: opening it for reading the ordinary way blocks forever."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def raw_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every flashtune table, as stored (no decoding): for 'row-for-row unchanged'
    when some rows are damaged and the store would skip them."""
    tables = ("flashtune_meta", "flashtune_runs", "flashtune_trials", "flashtune_winners")
    if url.startswith("sqlite"):
        raw = sqlite3.connect(make_url(url).database)
        try:
            return {t: raw.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
        finally:
            raw.close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            # Each row as PostgreSQL's own text: no driver conversion can fail on a damaged value.
            return {t: [tuple(r) for r in conn.execute(text(f"SELECT {t}::text FROM {t} ORDER BY 1"))]
                    for t in tables}
    finally:
        engine.dispose()


def winners_document(count: int, *, arch: str = "sm_90", ms: float = 1.0, first: int = 1) -> dict[str, Any]:
    """An exchange document of `count` winners of distinct keys (N = 16·i for i from `first`)."""
    from flashtune.db import exchange
    from flashtune.db.store import Winner

    winners = [exchange.winner_to_dict(Winner(
        key=key(16 * i, 64, causal=bool(i % 2), arch=arch), config=CFG_A, median_ms=ms, tflops=1.0,
        kernel_version="k1", gpu_name="NVIDIA H200", sm_count=132, driver="560.35", cuda="12.6",
        triton_version="3.6.0", torch_version="2.11.0", host="node-1", measured_at=aware(), trial_id=None))
        for i in range(first, first + count)]
    return {"format": "flashtune-winners", "format_version": 1, "exported_at": "2025-02-01T00:00:00Z",
            "producer": {"flashtune": "0.1.0", "schema_version": 1, "python": "3.11", "sqlalchemy": "2.0",
                         "pydantic": "2.5", "host": "node-1"},
            "filters": {}, "winners": winners}


def back_to_schema_2(url: str) -> None:
    """Turn a current PostgreSQL database back into schema 2's shape (no fleet job tables, no attention-feature
    key columns), rows kept."""
    from flashtune.db.models import JOB_TABLES

    back_to_schema_3(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in reversed(JOB_TABLES):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("UPDATE flashtune_meta SET value = '2' WHERE name = 'schema_version'"))
    engine.dispose()


def back_to_schema_3(url: str) -> None:
    """Turn a current database back into schema 3's shape (no attention-feature key columns); see back_to_schema."""
    back_to_schema(url, 3)


def back_to_schema(url: str, version: int) -> None:
    """Turn a current database back into schema `version`'s shape (3 or 4: without the key columns that joined
    later, db.models.FEATURE_SINCE; the unique keys and the trials index without them; schema 4's 8-character
    op column), rows kept: SQLite tables are rebuilt from their own DDL without those columns, PostgreSQL drops
    them (and with them the constraints) and adds the old ones."""
    from flashtune.db.models import FEATURE_SINCE, KEY_COLUMNS, JobKeyRow, RecordedRow, TrialRow, WinnerRow

    gone = [name for name, since in FEATURE_SINCE.items() if since > version]
    key_old = ", ".join(f'"{c}"' for c in KEY_COLUMNS if c not in gone)
    tables = [m.__table__.name for m in (TrialRow, WinnerRow, RecordedRow, JobKeyRow)]
    unique = {t.name: c.name for m in (WinnerRow, RecordedRow, JobKeyRow) for t in [m.__table__]
              for c in t.constraints if c.name and c.name.startswith("uq_")}
    job_id = {JobKeyRow.__table__.name: '"job_id", '}
    trials_index = f"CREATE INDEX ix_flashtune_trials_key ON flashtune_trials ({key_old}, kernel_version)"
    if url.startswith("sqlite"):
        raw = sqlite3.connect(make_url(url).database)
        try:
            raw.execute("PRAGMA legacy_alter_table = ON")  # a rename must not rewrite other tables' references
            for table in tables:
                create, = raw.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                                      (table,)).fetchone()
                indexes = [r[0] for r in raw.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND "
                                                     "tbl_name = ? AND sql IS NOT NULL", (table,))]
                lines = [line for line in create.split("\n")
                         if not any(line.strip().startswith((f"{f} ", f'"{f}" ')) for f in gone)]
                create = "\n".join(lines).replace("op VARCHAR(16)", "op VARCHAR(8)")
                for name in gone:
                    create = create.replace(f", {name}", "").replace(f', "{name}"', "")
                kept = [r[1] for r in raw.execute(f"PRAGMA table_info({table})") if r[1] not in gone]
                names = ", ".join(f'"{c}"' for c in kept)
                raw.execute(f"ALTER TABLE {table} RENAME TO {table}_now")
                for sql in indexes:
                    raw.execute(f"DROP INDEX {sql.split()[2]}")
                raw.execute(create)
                raw.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {table}_now")
                raw.execute(f"DROP TABLE {table}_now")
                for sql in indexes:
                    raw.execute(trials_index if "ix_flashtune_trials_key" in sql else sql)
            raw.execute(f"UPDATE flashtune_meta SET value = '{version}' WHERE name = 'schema_version'")
            raw.commit()
        finally:
            raw.close()
        return
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in tables:
            drops = ", ".join(f'DROP COLUMN "{c}"' for c in gone)
            conn.execute(text(f"ALTER TABLE {table} {drops}"))  # their constraints and index go with them
            conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN op TYPE VARCHAR(8)"))
            if table in unique:
                conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT {unique[table]} UNIQUE "
                                  f"({job_id.get(table, '')}{key_old})"))
        conn.execute(text(trials_index))
        conn.execute(text(f"UPDATE flashtune_meta SET value = '{version}' WHERE name = 'schema_version'"))
    engine.dispose()
