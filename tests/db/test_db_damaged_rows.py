"""Rows damaged by hand or by another program: read as data (skipped, named, warned once), never raised.

Each case writes one bad value with raw SQL (sqlite3 itself on SQLite, so no column type converts
it), then checks every reader: the store, the dispatcher's load, export, import and its dry run,
and doctor. None may crash or change a row.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flashtune.db import exchange
from flashtune.db.errors import DatabaseCorruptError
from flashtune.db.rows import DamagedRowWarning
from flashtune.db.store import Store, load_winners

from helpers.db import execute_raw, key, populate, raw_snapshot, run_info

# name -> (backends, column, SQL value, what the message says)
WINNER_DAMAGE = {
    "extra is a JSON list": (("sqlite", "postgresql"), "config_extra", "'[]'", "not an object"),
    "extra is not JSON": (("sqlite", "postgresql"), "config_extra", "'{tma: yes'", "not valid JSON"),
    "time is text": (("sqlite",), "median_ms", "'fast'", "not a number: 'fast'"),
    "time is NaN": (("postgresql",), "median_ms", "'NaN'", "must be a finite number"),
    "time is negative": (("sqlite", "postgresql"), "median_ms", "-1.5", "must be a finite number, positive"),
    "date is no date": (("sqlite",), "measured_at", "'yesterday'", "not a date: 'yesterday'"),
    "date past 9999": (("postgresql",), "measured_at", "'infinity'", "not a date: 'infinity'"),
    "causal is text": (("sqlite",), "causal", "'maybe'", "causal must be a bool"),
    "huge seq_len": (("sqlite",), "seq_len", "123456789012345678901234567890", "seq_len must be an int"),
    "arch not canonical": (("sqlite", "postgresql"), "arch", "'sm90'", "not stored in canonical form"),
    "unknown arch": (("sqlite", "postgresql"), "arch", "'sm_99'", "unknown arch"),
    "block size": (("sqlite", "postgresql"), "block_m", "48", "block_m=48"),
    "escape in gpu name": (("sqlite", "postgresql"), "gpu_name", "'x' || :esc || '[31m'",
                           "non-printable character U+001B"),
    "sm_count is text": (("sqlite",), "sm_count", "'many'", "not an int"),
}


def _cases(*skip_columns: str) -> list:
    return [pytest.param((backend, name), id=f"{backend}-{name}",
                         marks=[pytest.mark.postgres] if backend == "postgresql" else [])
            for name, (backends, column, *_) in WINNER_DAMAGE.items() if column not in skip_columns
            for backend in backends]


DAMAGED_KEY = key(512, 64, causal=True)


@pytest.fixture
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, int, str, str]:
    """(url, damaged row id, column, message) of a database of 12 winners, one of them damaged."""
    backend, name = request.param
    url = f"sqlite:///{tmp_path / 'flashtune.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    _, column, value, message = WINNER_DAMAGE[name]
    with Store.open(url) as store:
        populate(store)
    params = {"c": True, **({"esc": "\x1b"} if ":esc" in value else {})}
    execute_raw(url, f"UPDATE flashtune_winners SET {column} = {value} WHERE seq_len = 512 AND head_dim = 64 "
                     "AND causal = :c", params)
    with Store.open(url, create=False) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store.winners()
        (row_id,) = [d.row_id for d in store.damaged_rows]
    return url, row_id, column, message


def _one_warning(caught: list[warnings.WarningMessage]) -> str:
    messages = [str(w.message) for w in caught if issubclass(w.category, DamagedRowWarning)]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0]
    return messages[0]


@pytest.mark.parametrize("damaged", _cases(), indirect=True)
def test_damaged_winner_is_skipped_named_and_never_raised(damaged: tuple[str, int, str, str],
                                                          tmp_path: Path) -> None:
    url, row_id, column, message = damaged
    before = raw_snapshot(url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(url, create=False) as store:
            winners = store.winners()
            (problem,) = store.damaged_rows
        text = _one_warning(caught)
    assert len(winners) == 11 and DAMAGED_KEY not in {w.key for w in winners}
    assert (problem.table, problem.row_id, problem.column) == ("flashtune_winners", row_id, column)
    assert message in problem.problem
    assert f"flashtune_winners row {row_id}, column {column}" in text and "skipped 1 damaged row" in text
    assert "\x1b" not in text

    # The dispatcher's read: one warning, no exception (a row whose arch is damaged is no sm_90 row).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load_winners(["sm_90"], url)) == 11
        if column != "arch":
            _one_warning(caught)

    # Export leaves the row out; every value exported is a valid one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedRowWarning)
        with Store.open(url, create=False) as store:
            document = exchange.export_winners(store)
    assert len(document.winners) == 11
    path = tmp_path / "w.json"
    path.write_text(exchange.dump_document(document))
    assert len(exchange.read_document(path)) == 11
    assert raw_snapshot(url) == before  # reading changed nothing


# A damaged key column makes the row another key's (or none), so only the other columns apply here.
@pytest.mark.parametrize("damaged", _cases("arch", "seq_len", "causal"), indirect=True)
def test_import_reports_and_replaces_a_damaged_row(damaged: tuple[str, int, str, str], tmp_path: Path) -> None:
    url, row_id, column, _ = damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedRowWarning)
        with Store.open(url, create=False) as store:
            healthy = store.winners()[0]
    fixed = exchange.winner_to_dict(healthy)
    fixed["key"].update(seq_len=512, seq_len_kv=512, head_dim=64, causal=True)
    document = {"format": "flashtune-winners", "format_version": 1, "exported_at": "2025-02-01T00:00:00Z",
                "producer": {"flashtune": "0", "schema_version": 1, "python": "3", "sqlalchemy": "2",
                             "pydantic": "2", "host": "h"},
                "winners": [fixed, exchange.winner_to_dict(healthy)]}
    path = tmp_path / "fix.json"
    path.write_text(json.dumps(document))
    before = raw_snapshot(url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(url, create=False) as store:
            dry = exchange.import_file(store, path, dry_run=True)
        _one_warning(caught)
    assert raw_snapshot(url) == before
    assert [(d.row_id, d.column) for d in dry.damaged] == [(row_id, column)]
    assert [i.key for i in dry.added] == [DAMAGED_KEY] and len(dry.kept) == 1
    assert f"row {row_id}, column {column}" in json.dumps(dry.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedRowWarning)
        with Store.open(url) as store:
            real = exchange.import_file(store, path)
            assert [(d.row_id, d.column) for d in real.damaged] == [(row_id, column)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(url, create=False) as store:
            winners = {w.key: w for w in store.winners()}
            assert store.damaged_rows == []
    assert not caught
    assert len(winners) == 12 and winners[DAMAGED_KEY].config == healthy.config  # the row was repaired


def test_damaged_trials_are_skipped(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
    execute_raw(db_url, "UPDATE flashtune_trials SET outcome = 'great' WHERE id = 1")
    execute_raw(db_url, "UPDATE flashtune_trials SET median_ms = NULL WHERE id = 2")
    execute_raw(db_url, "UPDATE flashtune_trials SET error = :e WHERE id = 3", {"e": "line 1\nline 2"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(db_url, create=False) as store:
            trials = store.trials()
            problems = {(d.row_id, d.column) for d in store.damaged_rows}
        _one_warning(caught)
    assert len(trials) == 34 and {t.id for t in trials} >= {3}  # free text may hold a newline
    assert problems == {(1, "outcome"), (2, "median_ms")}


def test_unparseable_run_date_does_not_break_stale_run_listing(sqlite_url: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
        store.start_run(run_info())
    execute_raw(sqlite_url, "UPDATE flashtune_runs SET started_at = 'last tuesday' WHERE id = 2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(sqlite_url, create=False) as store:
            assert store.stale_runs() == []
            assert [(d.table, d.row_id, d.column) for d in store.damaged_rows] == [("flashtune_runs", 2, "started_at")]
        _one_warning(caught)


@pytest.mark.parametrize("value", ["9" * 5000, "²", "1.0", "", "-1"])
def test_unreadable_schema_version_is_corrupt_not_a_crash(sqlite_url: str, value: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    execute_raw(sqlite_url, "UPDATE flashtune_meta SET value = :v WHERE name = 'schema_version'", {"v": value})
    for create in (True, False):
        with pytest.raises(DatabaseCorruptError, match="no valid schema_version") as info:
            Store.open(sqlite_url, create=create)
        assert len(str(info.value)) < 400
    with pytest.raises(DatabaseCorruptError):
        load_winners(["sm_90"], sqlite_url)


# --- doctor ------------------------------------------------------------------------------------

def _doctor(url: str) -> list:
    from flashtune.tuner.doctor import check_database

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        findings = list(check_database(url, []))
    assert not [w for w in caught if issubclass(w.category, DamagedRowWarning)]  # reported once, as a finding
    for finding in findings:
        assert "\n" not in finding.message and "\x1b" not in finding.message
    return findings


def test_doctor_fails_on_damaged_rows(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
    bad_date = "'yesterday'" if db_url.startswith("sqlite") else "'infinity'"
    execute_raw(db_url, f"UPDATE flashtune_winners SET measured_at = {bad_date} WHERE seq_len = 128")
    execute_raw(db_url, "UPDATE flashtune_winners SET config_extra = '[]' WHERE seq_len = 2048")
    findings = _doctor(db_url)
    (damage,) = [f for f in findings if f.topic == "damaged rows"]
    assert damage.level == "fail" and "skipped 8 damaged row(s)" in damage.message
    assert "column measured_at: not a date" in damage.message
    assert "column config_extra" in damage.message or "(and 5 more)" in damage.message
    assert [f.level for f in findings if f.topic == "database"] == ["ok"]


def test_doctor_reports_a_huge_schema_version(sqlite_url: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    execute_raw(sqlite_url, "UPDATE flashtune_meta SET value = :v WHERE name = 'schema_version'", {"v": "7" * 5000})
    (finding,) = _doctor(sqlite_url)
    assert finding.level == "fail" and "no valid schema_version" in finding.message
