"""Schema 4 -> 5 (a packed call's token bucket and a paged cache's page size join the key, and the op column
widens for `varlen_bwd`) on real databases: a current database taken back to schema 4's shape, read as it is,
then migrated, its rows kept and the new keys stored beside their plain twins."""
from __future__ import annotations

import warnings

import pytest
from flashtune.db.errors import SchemaVersionError
from flashtune.db.jobs import JobQueue
from flashtune.db.models import KEY_COLUMNS
from flashtune.db.schema import SCHEMA_VERSION
from flashtune.db.store import Store, load_winners, migrate_database
from flashtune.db.types import Config, Key
from helpers.db import back_to_schema, populate, run_info

PLAIN = Key("sm_90", "kvcache", 1, 128, "bfloat16", True, 32768, batch_heads=32, group=8)
PAGED = Key("sm_90", "kvcache", 1, 128, "bfloat16", True, 32768, batch_heads=32, group=8, page_size=64)
PACKED = Key("sm_90", "varlen", 8192, 128, "bfloat16", True, 8192, batch_heads=16, tokens=32768)
PACKED_BWD = Key("sm_90", "varlen_bwd", 8192, 128, "bfloat16", True, 8192, batch_heads=16, tokens=32768)


def test_a_schema_4_database_reads_then_migrates_keeping_every_row(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
        run = store.start_run(run_info())
        store.offer_winner(store.record_trial(run, PLAIN, Config(16, 64, 4, 2), "ok", median_ms=0.05))
        store.add_recorded({PLAIN: 3})
        before = store.winners(), store.trials(), store.recorded()
    back_to_schema(db_url, 4)
    with Store.open(db_url, create=False) as store, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.schema_version == 4
        # Read as it is: every key is unpacked and contiguous, what each row of schema 4 meant.
        assert (store.winners(), store.trials(), store.recorded()) == before
        assert store.trials(PAGED) == [] and store.trials(PACKED) == []
        with pytest.raises(SchemaVersionError, match="schema version 4, whose job keys.*flashtune db migrate"):
            JobQueue(store)
    assert load_winners(["sm_90"], db_url) == before[0]
    with pytest.raises(SchemaVersionError, match="schema version 4, older .*flashtune db migrate"):
        Store.open(db_url)
    assert migrate_database(db_url) == (4, SCHEMA_VERSION)
    with Store.open(db_url) as store:
        assert (store.winners(), store.trials(), store.recorded()) == before
        # The unique keys include the new columns, and the op column holds `varlen_bwd`.
        run = store.start_run(run_info())
        for key in (PAGED, PACKED, PACKED_BWD):
            assert store.offer_winner(store.record_trial(run, key, Config(64, 64, 4, 2), "ok", median_ms=1.0))
        store.add_recorded({PAGED: 2, PACKED: 5})
        winners = {w.key: w for w in store.winners()}
        assert {PLAIN, PAGED, PACKED, PACKED_BWD} <= set(winners) and len(winners) == len(before[0]) + 3
        assert winners[PLAIN].config == Config(16, 64, 4, 2)
        assert {r.key: r.calls for r in store.recorded()} == {PLAIN: 3, PAGED: 2, PACKED: 5}
    assert migrate_database(db_url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert set(KEY_COLUMNS) >= {"tokens", "page_size"}


def test_packed_and_paged_keys_read_back_from_their_text() -> None:
    for key in (PAGED, PACKED, PACKED_BWD):
        assert Key.parse(str(key)) == key
    assert str(PACKED).endswith("/T=32768") and str(PAGED).endswith("/P=64")
    for bad in ({"tokens": 3000}, {"page_size": 48}, {"tokens": -1}, {"page_size": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Key("sm_90", "varlen", 1024, 64, "float16", False, **bad)
