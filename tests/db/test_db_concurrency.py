"""Several real processes on one database: concurrent writers, a writer killed mid-run, and a tuner
writing while a large import runs."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashtune.db import exchange
from flashtune.db.errors import DatabaseLockedError
from flashtune.db.store import Store
from flashtune.db.types import Config

from helpers.db import populate, snapshot, winners_document
from helpers.subproc import repo_env


# A tuner stand-in: one commit per trial, then the trial id on stdout (so the id is known to be
# committed when the parent reads it), and every trial offered as a winner.
WRITER = r"""
import sys, time
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
url, tag, count, start, offset = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
timeout = float(sys.argv[6]) if len(sys.argv) > 6 else None
with Store.open(url, timeout_s=timeout) as store:
    run = store.start_run(RunInfo("GPU", "sm_90", 132, 232448, "d", "c", "t", "p", "k1", tag, {}))
    while time.time() < start:
        time.sleep(0.005)
    i = 0
    while count <= 0 or i < count:
        key = Key("sm_90", "fwd", 16 * (i % 200 + 1), 64, "float16", False)
        trial = store.record_trial(run, key, Config(64, 64, 4, 2), "ok", median_ms=offset + i % 200,
                                   error=tag)
        store.offer_winner(trial)
        print(trial.id, flush=True)
        i += 1
"""


def _spawn(url: str, tag: str, count: int, start: float, offset: float,
           timeout_s: float | None = None) -> subprocess.Popen[str]:
    env = repo_env()
    extra = [] if timeout_s is None else [str(timeout_s)]
    return subprocess.Popen([sys.executable, "-c", WRITER, url, tag, str(count), str(start), str(offset), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_ids(proc: subprocess.Popen[str], count: int, deadline_s: float) -> list[int]:
    """The first `count` trial ids the writer prints (fewer if it ends or the deadline passes)."""
    assert proc.stdout is not None
    ids: list[int] = []
    deadline = time.time() + deadline_s
    while len(ids) < count and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        ids.append(int(line))
    return ids


def _kill_and_drain(proc: subprocess.Popen[str], sig: int) -> tuple[list[int], str]:
    """Signal the writer, then every id it printed after those read so far, and its stderr. The
    rest is read through the same file object: `communicate()` reads the descriptor directly and
    would lose lines that `readline()` had already buffered (which made this test flaky)."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.send_signal(sig)
    rest = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=30)
    return [int(x) for x in rest.split()], err


def test_two_writers_at_once_lose_nothing(db_url: str) -> None:
    Store.open(db_url).close()  # schema first, so the race is about trials
    start = time.time() + 2.0  # both processes are past their imports by then
    count = 300
    procs = {"a": _spawn(db_url, "a", count, start, 1.0), "b": _spawn(db_url, "b", count, start, 0.5)}
    ids = {}
    for tag, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        ids[tag] = [int(line) for line in out.split()]
        assert len(ids[tag]) == count
    with Store.open(db_url, create=False) as store:
        trials = store.trials()
        winners = store.winners()
    by_tag = {tag: {t.id for t in trials if t.error == tag} for tag in procs}
    assert by_tag == {tag: set(v) for tag, v in ids.items()}
    assert len(trials) == 2 * count
    # Both offered winners for the same 200 keys at once: b's times are lower for every key.
    assert len(winners) == 200
    b_ids = set(ids["b"])
    assert all(w.trial_id in b_ids and w.median_ms == 0.5 + (w.key.seq_len // 16 - 1) for w in winners)


def test_writer_killed_mid_run_keeps_every_commit(db_url: str, tmp_path: Path) -> None:
    Store.open(db_url).close()
    proc = _spawn(db_url, "k", 0, 0.0, 1.0)
    committed = _read_ids(proc, 300, 60)
    rest, err = _kill_and_drain(proc, signal.SIGKILL)
    committed += rest
    assert proc.returncode == -signal.SIGKILL, err
    assert len(committed) >= 300
    if db_url.startswith("sqlite"):
        path = Path(db_url.removeprefix("sqlite:///"))
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()
    with Store.open(db_url, create=False) as store:
        stored = {t.id for t in store.trials()}
        winners = store.winners()
    assert set(committed) <= stored
    assert len(stored) - len(committed) <= 1  # at most the trial in flight (committed, not printed)
    assert winners and all(w.config == Config(64, 64, 4, 2) for w in winners)


def test_a_tuner_writing_during_a_large_import_is_not_refused(sqlite_url: str, tmp_path: Path) -> None:
    # Before the import was batched, 3,000 winners held the write lock for about 15 s, longer than
    # the writer's 5 s: its record_trial failed with "database is locked".
    Store.open(sqlite_url).close()
    path = tmp_path / "big.json"
    path.write_text(json.dumps(winners_document(3000, first=300)))  # keys apart from the writer's
    writer = _spawn(sqlite_url, "t", 0, 0.0, 1.0, timeout_s=5.0)
    before = _read_ids(writer, 20, 60)
    assert len(before) == 20, writer.stderr.read() if writer.stderr else ""
    with Store.open(sqlite_url) as store:
        report = exchange.import_file(store, path)
    during = _read_ids(writer, 20, 60)  # the writer goes on after the import
    rest, err = _kill_and_drain(writer, signal.SIGTERM)
    assert writer.returncode == -signal.SIGTERM and len(during) == 20, err
    assert report.changed == 3000
    with Store.open(sqlite_url, create=False) as store:
        stored = {t.id for t in store.trials()}
        imported = [w for w in store.winners() if w.gpu_name == "NVIDIA H200"]
    assert set(before + during + rest) <= stored
    assert len(imported) == 3000


def test_dry_run_import_takes_no_write_lock(sqlite_url: str, tmp_path: Path) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    path = tmp_path / "w.json"
    path.write_text(json.dumps(winners_document(50, first=200)))
    before = snapshot(sqlite_url)
    holder = sqlite3.connect(tmp_path / "flashtune.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a tuner mid-commit, holding the write lock
    try:
        with Store.open(sqlite_url, create=False, timeout_s=0.5) as store:
            started = time.monotonic()
            dry = exchange.import_file(store, path, dry_run=True)
            assert time.monotonic() - started < 0.5 and len(dry.added) == 50
            with pytest.raises(DatabaseLockedError, match="database is locked.*gave up after"):
                exchange.import_file(store, path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert snapshot(sqlite_url) == before
