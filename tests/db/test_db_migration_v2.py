"""Schema 1 -> 2 (workload keys, kernel_config, the recorded table) on real databases, and format-1 files.

SQLite: the first H200 tuning database (schema 1) kept under bench/results (schema 1, 48 winners, 3576
trials), copied and migrated. PostgreSQL: a schema-2 database taken back to schema 1's shape by hand
(what `db migrate` of the old code created), then migrated.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from flashtune.db import exchange, schema
from flashtune.db.errors import SchemaVersionError
from flashtune.db.store import Store, migrate_database
from flashtune.db.types import Config, Key

from helpers.db import populate, winners_document

SCHEMA1_DB = Path(__file__).resolve().parents[2] / "bench" / "results" / "h200" / "tune_h200.db"


def _v1_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT arch, op, seq_len, seq_len_kv, head_dim, dtype, causal, block_m, block_n, "
                            "num_warps, num_stages, median_ms FROM flashtune_winners ORDER BY id").fetchall()


def test_the_schema1_sqlite_database_migrates_keeping_every_winner_and_trial(tmp_path: Path) -> None:
    path = tmp_path / "schema1.db"
    shutil.copy(SCHEMA1_DB, path)
    url = f"sqlite:///{path}"
    before = _v1_rows(path)
    assert len(before) == 48
    with pytest.raises(SchemaVersionError, match="schema version 1, older .*flashtune db migrate"):
        Store.open(url, create=False)
    assert migrate_database(url) == (1, schema.SCHEMA_VERSION)
    with Store.open(url, create=False) as store:
        winners = store.winners()
        assert len(store.trials()) == 3576 and store.recorded() == []
    got = [(w.key.arch, w.key.op, w.key.seq_len, w.key.seq_len_kv, w.key.head_dim, w.key.dtype, int(w.key.causal),
            w.config.block_m, w.config.block_n, w.config.num_warps, w.config.num_stages, w.median_ms)
           for w in sorted(winners, key=lambda w: w.trial_id or 0)]
    assert sorted(got) == sorted(before)
    # Schema-1 winners were timed at one synthetic size: no bucket recorded, plain multi-head inputs.
    assert {(w.key.batch_heads, w.key.group, w.kernel_config) for w in winners} == {(0, 1, None)}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ix_flashtune_trials_key", "ix_flashtune_winners_trial_id"} <= indexes


def test_new_key_columns_are_part_of_the_unique_key(db_url: str) -> None:
    with Store.open(db_url) as store:
        run = populate(store)
        base = Key("sm_90", "fwd", 777, 64, "float16", True)
        for bh, group in ((0, 1), (64, 1), (64, 4), (256, 4)):
            key = Key("sm_90", "fwd", 777, 64, "float16", True, batch_heads=bh, group=group)
            trial = store.record_trial(run, key, Config(64, 64, 4, 2), "ok", median_ms=1.0 + bh / 1000)
            assert store.offer_winner(trial, kernel_config=Config(128, 64, 8, 3) if bh == 256 else None)
        stored = {w.key: w for w in store.winners("sm_90") if w.key.seq_len == 777}
    assert len(stored) == 4 and base in stored
    assert stored[Key("sm_90", "fwd", 777, 64, "float16", True, batch_heads=256, group=4)].kernel_config == \
        Config(128, 64, 8, 3)


def test_recorded_counts_add_up_and_sort_most_called_first(db_url: str) -> None:
    a = Key("sm_90", "fwd", 4096, 128, "bfloat16", True, batch_heads=32, group=4)
    b = Key("sm_90", "fwd", 1024, 64, "float16", False, batch_heads=512)
    with Store.open(db_url) as store:
        store.add_recorded({a: 3})
        store.add_recorded({a: 2, b: 9})
        got = store.recorded()
        assert [(r.key, r.calls) for r in got] == [(b, 9), (a, 5)]
        assert got[1].first_seen <= got[1].last_seen
        assert store.recorded("sm_80") == []
        with pytest.raises(ValueError, match="positive int"):
            store.add_recorded({a: 0})
        assert [r.calls for r in store.recorded()] == [9, 5]  # the bad batch wrote nothing


def test_format_1_files_import_with_schema_1_meanings_and_export_is_format_2(db_url: str, tmp_path: Path) -> None:
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(winners_document(3)))  # a format-1 file, as the first release exported them
    with Store.open(db_url) as store:
        report = exchange.import_file(store, v1)
        assert report.added
        winners = store.winners()
        assert all(w.key.batch_heads == 0 and w.key.group == 1 for w in winners)
        out = json.loads(exchange.dump_document(exchange.export_winners(store)))
    assert out["format_version"] == 2 == exchange.FORMAT_VERSION
    assert all(w["key"]["batch_heads"] == 0 and w["key"]["group"] == 1 for w in out["winners"])
    out["winners"][0]["key"].update(batch_heads=64, group=4)
    out["winners"][0]["kernel_config"] = "m128-n64-w8-s3"
    out["winners"][1]["key"]["batch_heads"] = 48  # not a power of two
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(out))
    with pytest.raises(exchange.ExchangeFileError, match=r"winners\[1\]\.key\.batch_heads"):
        exchange.read_document(bad)
    del out["winners"][1]
    good = tmp_path / "v2.json"
    good.write_text(json.dumps(out))
    loaded = exchange.read_document(good)
    assert loaded[0].key.batch_heads == 64 and loaded[0].key.group == 4
    assert loaded[0].kernel_config == Config(128, 64, 8, 3)


@pytest.mark.postgres
def test_postgres_schema_1_database_migrates(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        run = populate(store)
        before = sorted((w.key.seq_len, w.key.head_dim, w.key.dtype, w.key.causal, w.config, w.median_ms)
                        for w in store.winners())
        del run
    engine = create_engine(pg_url)
    with engine.begin() as conn:  # back to schema 1's shape, as the old code created it
        conn.execute(text("DROP TABLE flashtune_recorded"))
        conn.execute(text("ALTER TABLE flashtune_winners DROP CONSTRAINT uq_flashtune_winners_key"))
        conn.execute(text('DROP INDEX ix_flashtune_trials_key'))
        for table in ("flashtune_winners", "flashtune_trials"):
            conn.execute(text(f'ALTER TABLE {table} DROP COLUMN batch_heads, DROP COLUMN "group"'))
        conn.execute(text("ALTER TABLE flashtune_winners DROP COLUMN kernel_config"))
        conn.execute(text("ALTER TABLE flashtune_winners ADD CONSTRAINT uq_flashtune_winners_key UNIQUE "
                          "(arch, op, seq_len, seq_len_kv, head_dim, dtype, causal)"))
        conn.execute(text("CREATE INDEX ix_flashtune_trials_key ON flashtune_trials "
                          "(arch, op, seq_len, seq_len_kv, head_dim, dtype, causal, kernel_version)"))
        conn.execute(text("UPDATE flashtune_meta SET value = '1' WHERE name = 'schema_version'"))
    engine.dispose()
    assert migrate_database(pg_url) == (1, schema.SCHEMA_VERSION)
    with Store.open(pg_url, create=False) as store:
        after = sorted((w.key.seq_len, w.key.head_dim, w.key.dtype, w.key.causal, w.config, w.median_ms)
                       for w in store.winners())
        assert after == before and store.recorded() == []
