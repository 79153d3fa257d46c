"""The store against a real SQLite file and (when configured) the real PostgreSQL server."""
from __future__ import annotations

import dataclasses
import math
import sqlite3
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from flashtune.db import schema
from flashtune.db.errors import DatabaseCorruptError, DatabaseUnavailableError, SchemaVersionError, StoreError
from flashtune.db.store import RunInfo, Store, TrialRecord, Winner, load_winners, migrate_database
from flashtune.db.types import Config

from helpers.db import CFG_A, CFG_B, CFG_C, execute_raw, file_digest, finishes_within, key, populate, run_info, snapshot


def test_trials_round_trip_exactly(db_url: str) -> None:
    with Store.open(db_url) as store:
        run = store.start_run(run_info())
        k = key(1000, 128, "bfloat16", False, n_kv=3000)
        ok = store.record_trial(run, k, CFG_B, "ok", median_ms=0.1 + 0.2, tflops=312.5, compile_s=1.25)
        bad = store.record_trial(run, k, CFG_C, "compile_error", compile_s=0.75, error="line 1\nline 2")
    with Store.open(db_url, create=False) as store:
        got = store.trials(k)
    assert got == [ok, bad]
    assert got[0].median_ms == 0.30000000000000004  # a double, bit for bit
    assert got[0].key.seq_len_kv == 3000 and got[0].config.extra_dict == {"tma": True}
    assert got[0].kernel_version == "k1" and got[0].gpu_name == "NVIDIA H200"
    assert got[0].created_at.tzinfo is not None
    assert got[1].error == "line 1\nline 2" and got[1].median_ms is None


def test_trial_filters(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
        populate(store, arch="sm_80", gpu_name="NVIDIA A100", kernel_version="k2")
        assert len(store.trials()) == 2 * 12 * 3
        assert len(store.trials(arch="sm80")) == 36
        assert {t.gpu_name for t in store.trials(kernel_version="k2")} == {"NVIDIA A100"}
        assert len(store.trials(outcome="out_of_resources")) == 24
        assert [t.config for t in store.trials(key(128, 64, causal=False), gpu_name="NVIDIA H200")] == \
            [CFG_A, CFG_B, CFG_C]
        with pytest.raises(ValueError, match="unknown trial outcome 'fine'"):
            store.trials(outcome="fine")


def test_offer_winner_rules(db_url: str) -> None:
    with Store.open(db_url) as store:
        run = store.start_run(run_info())
        k = key()
        slow = store.record_trial(run, k, CFG_A, "ok", median_ms=2.0)
        fast = store.record_trial(run, k, CFG_B, "ok", median_ms=1.0)
        failed = store.record_trial(run, k, CFG_C, "wrong_result", error="max abs err 0.5")
        assert store.offer_winner(slow) is True          # none yet
        assert store.offer_winner(fast) is True          # faster
        assert store.offer_winner(slow) is False         # slower
        assert store.offer_winner(fast) is False         # not strictly faster than itself
        assert store.offer_winner(failed) is False       # not ok
        (w,) = store.winners()
        assert (w.config, w.median_ms, w.trial_id) == (CFG_B, 1.0, fast.id)
        assert store.offer_winner(slow, replace=True) is True
        assert store.winners()[0].config == CFG_A
        # A winner from another kernel version is stale: a slower trial of this one replaces it.
        run2 = store.start_run(run_info(kernel_version="k2"))
        slower_new = store.record_trial(run2, k, CFG_C, "ok", median_ms=5.0)
        assert store.offer_winner(slower_new) is True
        (w,) = store.winners()
        assert (w.config, w.kernel_version, w.median_ms) == (CFG_C, "k2", 5.0)
        # Provenance comes from the run.
        assert (w.sm_count, w.driver, w.cuda, w.triton_version, w.torch_version, w.host) == \
            (132, "560.35", "12.6", "3.6.0", "2.11.0", "node-1")
        assert w.measured_at == slower_new.created_at


def test_winners_are_unique_per_key_and_immutable(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
        populate(store, scale=0.5)  # same keys, all faster: replaces, never duplicates
        winners = store.winners()
    assert len(winners) == 12 and len({w.key for w in winners}) == 12
    assert all(w.config == CFG_B for w in winners)
    assert all(math.isclose(w.median_ms, 0.5 * 0.8 * w.key.seq_len * w.key.head_dim / 1e5) for w in winners)
    with pytest.raises(dataclasses.FrozenInstanceError):
        winners[0].median_ms = 0.0  # type: ignore[misc]


def test_winner_filters_and_load_winners(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
        populate(store, arch="sm_80", gpu_name="NVIDIA A100")
        assert len(store.winners("sm_90")) == 12
        assert len(store.winners("90", head_dim=128, causal=True)) == 3
        assert len(store.winners(dtype="fp16", op="fwd")) == 24
        assert store.winners(dtype="bf16") == []
        with pytest.raises(ValueError, match="unknown arch 'sm_99'"):
            store.winners("sm_99")
        with pytest.raises(ValueError, match="unknown dtype 'int8'"):
            store.winners(dtype="int8")
        expected = store.winners("sm_80") + store.winners("sm_90")
    got = load_winners(["sm_90", "sm_80", "sm_70"], db_url)  # sm_70: a real chip, nothing tuned
    assert sorted(got, key=lambda w: str(w.key)) == sorted(expected, key=lambda w: str(w.key))
    assert load_winners([], db_url) == []


def test_prune_other_kernel_versions(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store, kernel_version="old")
        populate(store, arch="sm_80", gpu_name="NVIDIA A100", kernel_version="new")
        assert store.prune("new") == (36, 12)
        assert {w.kernel_version for w in store.winners()} == {"new"}
        assert store.counts() == {"runs": 1, "trials": 36, "winners": 12}
        assert store.prune("new") == (0, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"outcome": "great"}, "unknown trial outcome 'great'"),
    ({"median_ms": float("nan")}, "median_ms must be a finite number"),
    ({"median_ms": -1.0}, "median_ms must be positive"),
    ({"median_ms": None}, "an 'ok' trial needs its median_ms"),
    ({"tflops": float("inf")}, "tflops must be a finite number"),
])
def test_record_trial_rejects_bad_values(db_url: str, kwargs: dict, message: str) -> None:
    with Store.open(db_url) as store:
        run = store.start_run(run_info())
        args = {"outcome": "ok", "median_ms": 1.0, **kwargs}
        outcome = args.pop("outcome")
        with pytest.raises(ValueError, match=message):
            store.record_trial(run, key(), CFG_A, outcome, **args)
        with pytest.raises(ValueError, match="is for sm_80 but run .* ran on sm_90"):
            store.record_trial(run, key(arch="sm_80"), CFG_A, "ok", median_ms=1.0)
        with pytest.raises(ValueError, match="no run with id 999"):
            store.record_trial(999, key(), CFG_A, "ok", median_ms=1.0)
        with pytest.raises(TypeError):
            store.record_trial(run, "sm_90/fwd", CFG_A, "ok", median_ms=1.0)  # type: ignore[arg-type]
        assert store.trials() == []


@pytest.mark.parametrize("changes, error, message", [
    ({"args": {"f": object()}}, ValueError, "JSON-able"),
    ({"args": {"x": float("nan")}}, ValueError, "JSON-able"),
    ({"sm_count": -1}, ValueError, "RunInfo.sm_count must be an int from 0 to 2147483647"),
    ({"sm_count": 2**63}, ValueError, "RunInfo.sm_count"),
    ({"smem_limit": 10**400}, ValueError, "RunInfo.smem_limit must be an int .* got an int of 1329 bits"),
    ({"gpu_name": "H200\x1b[2J"}, ValueError, "RunInfo.gpu_name holds the non-printable character U\\+001B"),
    ({"host": "node-1\nFAKE"}, ValueError, "RunInfo.host holds the non-printable character U\\+000A"),
    ({"driver": "560\u202e"}, ValueError, "RunInfo.driver .*U\\+202E"),
    ({"kernel_version": "k1\x00"}, ValueError, "RunInfo.kernel_version"),
    ({"kernel_version": " "}, ValueError, "RunInfo.kernel_version must not be empty"),
    ({"host": "h" * 256}, ValueError, "RunInfo.host is 256 characters long, more than 255"),
    ({"cuda": None}, TypeError, "RunInfo.cuda must be a str"),
])
def test_run_info_is_checked_when_built(changes: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        dataclasses.replace(run_info(), **changes)


@pytest.mark.parametrize("call, message", [
    (lambda s, run: s.finish_run(5), "no run with id 5"),
    (lambda s, run: s.finish_run(2**70), "no run with id"),
    (lambda s, run: s.finish_run(run, "done\x1b[2J"), "run status holds the non-printable"),
    (lambda s, run: s.record_trial(2**63, key(), CFG_A, "ok", median_ms=1.0), "no run with id"),
    (lambda s, run: s.record_trial(run, key(), CFG_A, "ok", median_ms=10**400), "median_ms must be a finite number"),
    (lambda s, run: s.winners(head_dim=10**30), "unsupported head dim"),
    (lambda s, run: s.winners(causal="no"), "causal must be a bool"),
    (lambda s, run: s.trials(key(2**31)), "seq_len must be an int from 1 to 2147483647"),
])
def test_values_the_database_cannot_hold_are_value_errors(db_url: str, call, message: str) -> None:
    with Store.open(db_url) as store:
        run = store.start_run(run_info())
        before = store.counts()
        with pytest.raises(ValueError, match=message):
            call(store, run)
        assert store.counts() == before


@pytest.mark.parametrize("fields, column", [
    ({"seq_len": 2**31}, "seq_len"), ({"seq_len": 2**63}, "seq_len"), ({"seq_len_kv": 10**400}, "seq_len_kv"),
    ({"head_dim": 10**400}, "head_dim"), ({"causal": "False"}, "causal"), ({"causal": None}, "causal"),
    ({"arch": "sm_99"}, "arch"), ({"dtype": 5}, "dtype"),
])
def test_key_fields_are_checked_and_named(fields: dict, column: str) -> None:
    from flashtune.db.types import InvalidField, Key

    args = {"arch": "sm_90", "op": "fwd", "seq_len": 128, "head_dim": 64, "dtype": "fp16", "causal": True, **fields}
    with pytest.raises(InvalidField) as info:
        Key(**args)
    assert info.value.field == column and len(str(info.value)) < 200


@pytest.mark.parametrize("extra, message", [
    ({"num_splits": 2**63}, "must be an int from"), ({"scale": float("inf")}, "must be a finite number"),
    ({"loads": "tma\x1b"}, "non-printable"), ({"loads": "x" * 65}, "more than 64"), ({"Bad": 1}, "identifier"),
])
def test_config_extra_is_bounded(extra: dict, message: str) -> None:
    from flashtune.db.types import InvalidField

    with pytest.raises(InvalidField, match=message) as info:
        Config(64, 64, 4, 2, extra)
    assert info.value.field == "extra"


def test_config_parse_is_bounded() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        Config.parse('m64-n64-w4-s2+{"x": ' + "[" * 2000 + "]" * 2000 + "}")
    with pytest.raises(ValueError, match="at most 4096 characters"):
        Config.parse("m64-n64-w4-s2+{" + " " * 5000 + "}")
    with pytest.raises(ValueError, match="must be finite"):
        Config.from_dict({"block_m": float("inf"), "block_n": 64, "num_warps": 4, "num_stages": 2})


# --- SQLite specifics --------------------------------------------------------------------------

def test_sqlite_pragmas(sqlite_url: str, tmp_path: Path) -> None:
    with Store.open(sqlite_url) as store:
        with store._engine.connect() as conn:  # the store's own connections
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    raw = sqlite3.connect(tmp_path / "flashtune.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    raw.close()


def test_open_without_create_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "none.db"
    with pytest.raises(DatabaseUnavailableError, match="no file at"):
        Store.open(f"sqlite:///{path}", create=False)
    with pytest.raises(DatabaseUnavailableError):
        load_winners(["sm_90"], f"sqlite:///{path}")
    assert not path.parent.exists()
    # An empty file is a valid, empty SQLite database: still nothing to read, nothing created.
    path.parent.mkdir()
    path.touch()
    with pytest.raises(DatabaseUnavailableError, match="holds no flashtune tables"):
        Store.open(f"sqlite:///{path}", create=False)
    assert path.stat().st_size == 0


def test_default_url_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flashtune.db.paths import default_url

    monkeypatch.setenv("FLASHTUNE_DB", f"sqlite:///{tmp_path}/env.db")
    assert default_url() == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.delenv("FLASHTUNE_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_url() == f"sqlite:///{tmp_path}/data/flashtune/flashtune.db"
    with Store.open() as store:  # the default location is created on first write
        assert store.schema_version == schema.SCHEMA_VERSION
    assert (tmp_path / "data" / "flashtune" / "flashtune.db").exists()


def assert_refused_untouched(path: Path, match: str) -> None:
    """Writers and readers both refuse the file, and its bytes stay as they were."""
    before = file_digest(path)
    for create in (True, False):
        with pytest.raises(DatabaseCorruptError, match=match):
            Store.open(f"sqlite:///{path}", create=create)
    with pytest.raises(DatabaseCorruptError):
        load_winners(["sm_90"], f"sqlite:///{path}")
    assert file_digest(path) == before


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    assert_refused_untouched(path, "is not a SQLite file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_sqlite_file(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "flashtune.db"
    with Store.open(f"sqlite:///{path}") as store:
        run = store.start_run(run_info())
        for n in range(1, 300):
            store.offer_winner(store.record_trial(run, key(16 * n), CFG_A, "ok", median_ms=1.0,
                                                  error="x" * 300))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * fraction) // 4096 * 4096)
    assert_refused_untouched(path, "malformed")


def test_sqlite_without_flashtune_tables_is_not_touched_by_readers(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE flashtune_winners (id INTEGER PRIMARY KEY)")  # half a schema
    raw.commit()
    raw.close()
    assert_refused_untouched(path, "no flashtune_meta table")


def test_read_only_locations(tmp_path: Path) -> None:
    # Paths no process can create, even as root (the tests may run as root).
    for url in ("sqlite:////proc/flashtune-test/flashtune.db", "sqlite:////proc/flashtune-test.db"):
        with pytest.raises(DatabaseUnavailableError, match="flashtune-test"):
            Store.open(url)
    # An existing database opened read-only: reads work, a write is refused, nothing changes.
    path = tmp_path / "flashtune.db"
    with Store.open(f"sqlite:///{path}") as store:
        populate(store)
    before = file_digest(path)
    ro_url = f"sqlite:///file:{path}?mode=ro&uri=true"
    with Store.open(ro_url, create=False) as store:
        assert len(store.winners()) == 12
        with pytest.raises(DatabaseUnavailableError, match="readonly"):
            store.start_run(run_info())
    assert file_digest(path) == before


def test_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        Store.open("mysql://user@host/db")
    with pytest.raises(ValueError, match="malformed database URL"):
        Store.open("not a url")


# --- schema versions ---------------------------------------------------------------------------

def _set_version(url: str, version: int) -> None:
    with Store.open(url) as store:
        with store._engine.begin() as conn:
            conn.execute(text("UPDATE flashtune_meta SET value = :v WHERE name = 'schema_version'"),
                         {"v": str(version)})


def test_newer_schema_is_refused_naming_both_versions(db_url: str) -> None:
    with Store.open(db_url) as store:
        populate(store)
    _set_version(db_url, 7)
    for create in (True, False):
        with pytest.raises(SchemaVersionError, match=rf"schema version 7, newer than version {schema.SCHEMA_VERSION}"):
            Store.open(db_url, create=create)
    with pytest.raises(SchemaVersionError):
        migrate_database(db_url)
    with pytest.raises(SchemaVersionError):
        load_winners(["sm_90"], db_url)


def test_older_schema_is_refused_then_migrated(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(db_url) as store:
        populate(store)
        before = store.winners()

    # Pretend this code is one schema version ahead, with the step that gets there.
    def add_notes_column(conn) -> None:
        conn.execute(text("ALTER TABLE flashtune_winners ADD COLUMN notes TEXT"))

    now, ahead = schema.SCHEMA_VERSION, schema.SCHEMA_VERSION + 1
    monkeypatch.setattr(schema, "SCHEMA_VERSION", ahead)
    monkeypatch.setattr(schema, "MIGRATIONS",
                        [*schema.MIGRATIONS, schema.Migration(ahead, "add winners.notes", add_notes_column)])
    # The step changes a table that readers read, so readers need it too.
    monkeypatch.setattr(schema, "READABLE_SINCE", ahead)
    for create in (True, False):
        with pytest.raises(SchemaVersionError, match=rf"version {now}, older .*flashtune db migrate"):
            Store.open(db_url, create=create)
    assert migrate_database(db_url) == (now, ahead)
    assert migrate_database(db_url) == (ahead, ahead)
    with Store.open(db_url, create=False) as store:
        assert store.schema_version == ahead
        assert store.winners() == before
        with store._engine.connect() as conn:
            conn.execute(text("SELECT notes FROM flashtune_winners"))


def test_failed_migration_leaves_old_version(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(db_url) as store:
        populate(store)
    before = snapshot(db_url)

    def broken(conn) -> None:
        conn.execute(text("ALTER TABLE flashtune_winners ADD COLUMN notes TEXT"))
        conn.execute(text("SELECT no_such_column FROM flashtune_winners"))

    now = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", now + 1)
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, schema.Migration(now + 1, "broken", broken)])
    with pytest.raises(StoreError):
        migrate_database(db_url)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", now)
    assert snapshot(db_url) == before
    with Store.open(db_url) as store:
        with store._engine.connect() as conn:
            columns = conn.execute(text("SELECT * FROM flashtune_winners")).keys()
    assert "notes" not in columns


# --- PostgreSQL specifics ----------------------------------------------------------------------

def test_unreachable_postgres_masks_password() -> None:
    url = "postgresql+psycopg://flashtune:s3cret@127.0.0.1:1/test?connect_timeout=2"
    with pytest.raises(DatabaseUnavailableError) as info:
        Store.open(url)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(DatabaseUnavailableError):
        load_winners(["sm_90"], url)


def test_postgres_url_without_its_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as on a machine without the postgres extra
    with pytest.raises(DatabaseUnavailableError, match=r"pip install '\.\[postgres\]'") as info:
        Store.open("postgresql+psycopg://flashtune:s3cret@127.0.0.1:5432/test")
    assert "s3cret" not in str(info.value)


@pytest.mark.postgres
def test_postgres_empty_schema_without_create(pg_url: str) -> None:
    with pytest.raises(DatabaseUnavailableError, match="holds no flashtune tables"):
        Store.open(pg_url, create=False)
    assert migrate_database(pg_url) == (None, schema.SCHEMA_VERSION)
    with Store.open(pg_url, create=False) as store:
        assert store.backend == "postgresql" and store.winners() == []


def test_values_are_plain(sqlite_url: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
        trial = store.trials()[0]
        winner = store.winners()[0]
    assert isinstance(trial, TrialRecord) and isinstance(winner, Winner)
    assert isinstance(winner.config, Config) and hash(winner.key) == hash(trial.key)


def test_locked_database_is_unavailable_not_lost(sqlite_url: str, tmp_path: Path) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    before = snapshot(sqlite_url)
    holder = sqlite3.connect(tmp_path / "flashtune.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-write, holding the lock
    try:
        with Store.open(sqlite_url, timeout_s=0.2) as store:
            assert len(store.winners()) == 12  # WAL: readers do not wait for the writer
            with pytest.raises(DatabaseUnavailableError, match="locked"):
                store.start_run(run_info())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert snapshot(sqlite_url) == before


def test_tilde_in_a_sqlite_url_is_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with Store.open("sqlite:///~/sub/ft.db") as store:
        store.start_run(RunInfo("GPU", "sm_90", 1, 1, "", "", "", "", "k", "h", {}))
    assert (tmp_path / "sub" / "ft.db").exists() and not (tmp_path / "~").exists()


# --- paths that are not regular files, and runs that were killed -------------------------------

@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_database_path_that_is_not_a_regular_file(kind: str, tmp_path: Path, fifo: Path) -> None:
    path = {"fifo": fifo, "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    url = f"sqlite:///{path}"
    calls = [lambda: Store.open(url), lambda: Store.open(url, create=False), lambda: migrate_database(url),
             lambda: load_winners(["sm_90"], url)]
    for call in calls:
        with pytest.raises(DatabaseUnavailableError, match="not a regular file") as info:
            finishes_within(10, call, unblock=fifo)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def _age(url: str, table: str, column: str, where: str, hours: float) -> None:
    when = datetime.now(timezone.utc) - timedelta(hours=hours)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f") + ("" if url.startswith("sqlite") else "+00:00")
    execute_raw(url, f"UPDATE {table} SET {column} = :t WHERE {where}", {"t": stamp})


def test_stale_runs_are_listed(db_url: str) -> None:
    with Store.open(db_url) as store:
        dead = store.start_run(run_info(host="dead"))
        store.record_trial(dead, key(), CFG_A, "ok", median_ms=1.0)
        idle = store.start_run(run_info(host="idle"))  # killed before its first trial
        done = store.start_run(run_info(host="done"))
        store.finish_run(done)
        live = store.start_run(run_info(host="live"))
        store.record_trial(live, key(), CFG_B, "ok", median_ms=1.0)
    for run, hours in ((dead, 5), (idle, 3), (done, 9), (live, 4)):
        _age(db_url, "flashtune_runs", "started_at", f"id = {run}", hours)
    _age(db_url, "flashtune_trials", "created_at", f"run_id = {dead}", 2)  # live's trial is recent
    with Store.open(db_url, create=False) as store:
        stale = store.stale_runs()
        assert [(r.run_id, r.host) for r in stale] == [(dead, "dead"), (idle, "idle")]
        assert 1.9 < (datetime.now(timezone.utc) - stale[0].last_activity).total_seconds() / 3600 < 2.1
        assert [r.run_id for r in store.stale_runs(timedelta(hours=2.5))] == [idle]
        assert store.stale_runs(timedelta(days=1)) == []


def test_doctor_warns_about_stale_runs(sqlite_url: str) -> None:
    from flashtune.tuner.doctor import check_database

    with Store.open(sqlite_url) as store:
        run = store.start_run(run_info(gpu_name="NVIDIA H200", host="node-7"))
    _age(sqlite_url, "flashtune_runs", "started_at", f"id = {run}", 3)
    (finding,) = [f for f in check_database(sqlite_url, []) if f.topic == "stale run"]
    assert finding.level == "warn"
    assert f"run {run} (NVIDIA H200 on node-7" in finding.message and "probably killed" in finding.message


def test_doctor_reports_unusable_urls_as_one_fail_line(tmp_path: Path, fifo: Path) -> None:
    from flashtune.tuner.doctor import check_database

    for url in ("mysql://u:s3cret@h/d", "not a url", "sqlite://", f"sqlite:///{fifo}", "sqlite:///~nobody-ft/x.db",
                f"sqlite:////tmp/{'a' * 5000}.db"):
        findings = finishes_within(10, lambda: list(check_database(url, [])), unblock=fifo)
        assert [(f.level, f.topic) for f in findings] == [("fail", "database")], url
        assert "\n" not in findings[0].message and "s3cret" not in findings[0].message


# --- locks -------------------------------------------------------------------------------------

def test_a_writer_waits_for_a_lock_held_briefly(sqlite_url: str, tmp_path: Path) -> None:
    with Store.open(sqlite_url, timeout_s=10) as store:
        holder = sqlite3.connect(tmp_path / "flashtune.db", isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(1.0, lambda: holder.execute("COMMIT"))
        release.start()
        try:
            started = time.monotonic()
            run = store.start_run(run_info())
            assert time.monotonic() - started >= 0.8
        finally:
            release.join()
            holder.close()
        assert store.counts()["runs"] == 1 and run >= 1
