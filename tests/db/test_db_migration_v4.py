"""Schema 3 -> 4 (the attention features join the key) on real databases: a current database with winners,
trials, recorded keys and a fleet job, taken back to schema 3's shape, then read as it is and migrated."""
from __future__ import annotations

import warnings

import pytest
from sqlalchemy import create_engine, inspect

from helpers.db import back_to_schema_3, populate, run_info
from flashtune.db.errors import SchemaVersionError
from flashtune.db.jobs import JobQueue, Worker
from flashtune.db.models import JOB_TABLES, KEY_COLUMNS
from flashtune.db.store import Store, load_winners, migrate_database
from flashtune.db.schema import SCHEMA_VERSION
from flashtune.db.types import FEATURE_DEFAULTS, FEATURES, Config, Key
from flashtune.tuner.fleet.units import claim_units

RECORDED = {Key("sm_90", "fwd", 4096, 128, "bfloat16", True, batch_heads=32, group=4): 7,
            Key("sm_90", "kvcache", 1, 64, "float16", True, 8192, batch_heads=64, group=8): 3}
SOFTCAP = Key("sm_90", "fwd", 128, 64, "float16", False, softcap=True)


def _everything(url: str) -> tuple:
    with Store.open(url, create=False) as store:
        jobs = JobQueue(store).status() if store.schema_version >= 4 else None
        return store.winners(), store.trials(), sorted(store.recorded(), key=lambda r: r.calls), jobs


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_a_schema_3_database_reads_then_migrates_keeping_every_row(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
        store.add_recorded(RECORDED)
        keys = [w.key for w in store.winners()][:3]
        queue = JobQueue(store)
        job, _ = queue.create("nightly", "sm_90", "k1", claim_units(keys), lease_s=60, args={}, host="h")
        claim = queue.claim(job, Worker("h", 1, 0))
        assert claim is not None and queue.finish_key(claim, claim.keys[0])
    before = _everything(db_url)
    assert before[0] and before[1] and len(before[2]) == 2 and before[3][0].counts["done"] == 1
    back_to_schema_3(db_url)
    for table in ("flashtune_trials", "flashtune_winners", "flashtune_recorded", *JOB_TABLES[2:]):
        assert not set(FEATURES) & _columns(db_url, table)  # schema 3's shape, really
    # Read as it is (apps keep their winners until someone migrates): every key has its features off.
    with Store.open(db_url, create=False) as store, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.schema_version == 3
        assert (store.winners(), store.trials(), sorted(store.recorded(), key=lambda r: r.calls)) == before[:3]
        assert store.trials(before[1][0].key) == [t for t in before[1] if t.key == before[1][0].key]
        assert store.trials(SOFTCAP) == []  # no row of schema 3 has a feature on
        with pytest.raises(SchemaVersionError, match="schema version 3, whose job keys.*flashtune db migrate"):
            JobQueue(store)
    assert load_winners(["sm_90"], db_url) == [w for w in before[0] if w.key.arch == "sm_90"]
    with pytest.raises(SchemaVersionError, match="schema version 3, older .*flashtune db migrate"):
        Store.open(db_url)
    assert migrate_database(db_url) == (3, SCHEMA_VERSION)
    after = _everything(db_url)
    assert after[:3] == before[:3]
    assert [(k.key, k.state) for k in after[3][0].keys] == [(k.key, k.state) for k in before[3][0].keys]
    assert all(w.key.features == tuple(FEATURE_DEFAULTS.values()) for w in after[0])
    assert migrate_database(db_url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    # The migrated unique keys include the features: a softcap winner beside its plain twin.
    with Store.open(db_url) as store:
        run = store.start_run(run_info())
        plain = Key("sm_90", "fwd", 128, 64, "float16", False)
        assert any(w.key == plain for w in store.winners())
        trial = store.record_trial(run, SOFTCAP, Config(64, 64, 4, 2), "ok", median_ms=5.0)
        assert store.offer_winner(trial)
        store.add_recorded({SOFTCAP: 2})
        keys = {w.key for w in store.winners()}
        assert {plain, SOFTCAP} <= keys and len(keys) == len(before[0]) + 1
        assert {r.key: r.calls for r in store.recorded()}[SOFTCAP] == 2
        job, created = JobQueue(store).create("features", "sm_90", "k1", claim_units([SOFTCAP, plain]), lease_s=60,
                                              args={}, host="h")
        assert created and {k.key for k in JobQueue(store).status("features")[0].keys} == {SOFTCAP, plain}
    assert set(KEY_COLUMNS) <= _columns(db_url, "flashtune_winners")
