"""The recorded-keys table under load: counts saturate instead of overflowing, a flush writes in
short batches that let other writers in between, and listings stream, on SQLite and PostgreSQL."""
from __future__ import annotations

import json

from click.testing import CliRunner

from flashtune.db import exchange
from flashtune.db.store import _STREAM_ROWS, MAX_RECORDED_CALLS, RECORDED_BATCH, Store
from flashtune.db.types import Key
from flashtune.tuner.cli import main as cli


def test_a_count_saturates_at_its_maximum_instead_of_overflowing(db_url: str) -> None:
    key = Key("sm_90", "fwd", 4096, 128, "bfloat16", True, batch_heads=32, group=4)
    other = Key("sm_90", "fwd", 1024, 64, "float16", False)
    with Store.open(db_url) as store:
        for _ in range(3):  # 3 * (2**62 - 1) is past 2**63 - 1
            store.add_recorded({key: 2**62 - 1, other: 1})
        store.add_recorded({key: 5, other: 1})  # a later flush still works
        got = {r.key: r.calls for r in store.recorded()}
        assert got == {key: MAX_RECORDED_CALLS, other: 4}
        assert store.damaged_rows == []
        store.add_recorded({other: 10**30})  # a count beyond the column is stored at the maximum
        assert {r.key: r.calls for r in store.recorded()}[other] == MAX_RECORDED_CALLS


def test_a_large_flush_commits_batch_by_batch_and_lets_another_writer_in(db_url: str) -> None:
    counts = {Key("sm_90", "fwd", 128 + i, 64, "float16", False): 1 + i % 7 for i in range(2 * RECORDED_BATCH + 5)}
    probe = Key("sm_80", "fwd", 64, 64, "float16", True)
    seen: list[tuple[int, int]] = []

    def written(keys: list[Key]) -> None:
        # Another process's write between two batches finds the lock free (a 1 s wait at most).
        with Store.open(db_url, timeout_s=1.0) as other:
            other.add_recorded({probe: 1})
            seen.append((len(keys), len(other.recorded("sm_90"))))

    with Store.open(db_url) as store:
        store.add_recorded(counts, written)
        stored = {r.key: r.calls for r in store.recorded()}
    assert seen == [(RECORDED_BATCH, RECORDED_BATCH), (RECORDED_BATCH, 2 * RECORDED_BATCH), (5, len(counts))]
    assert stored == {**counts, probe: 3}


def test_show_recorded_json_streams_every_row_in_order(db_url: str) -> None:
    counts = {Key("sm_90", "fwd", 64 * (1 + i), 64, "float16", True, batch_heads=8): 1 + i % 50
              for i in range(2 * _STREAM_ROWS + 3)}
    with Store.open(db_url) as store:
        store.add_recorded(counts)
        listed = store.recorded()
        streamed = store.iter_recorded()
        assert next(streamed) == listed[0] and [listed[0], *streamed] == listed
    assert [(r.key, r.calls) for r in listed] == sorted(counts.items(), key=lambda kv: -kv[1])
    shown = CliRunner().invoke(cli, ["show", "--recorded", "--json", "--db", db_url])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == json.dumps([{**exchange.key_to_dict(r.key), "calls": r.calls,
                                        "first_seen": r.first_seen.isoformat(), "last_seen": r.last_seen.isoformat()}
                                       for r in listed], indent=1) + "\n"
