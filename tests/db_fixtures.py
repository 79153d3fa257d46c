"""Shared fixtures and helpers of the db tests (imported by tests/test_db*.py).

`db_url` runs a test on a fresh SQLite file and, when FLASHTUNE_TEST_PG_URL is set, on the real
PostgreSQL server too, isolated in a schema of its own that is dropped afterwards.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

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
