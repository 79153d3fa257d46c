"""Several real processes on one database: concurrent writers, and a writer killed mid-run."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from flashtune.db.store import Store
from flashtune.db.types import Config

from db_fixtures import db_url, pg_url  # noqa: F401
from subproc import repo_env


# A tuner stand-in: one commit per trial, then the trial id on stdout (so the id is known to be
# committed when the parent reads it), and every trial offered as a winner.
WRITER = r"""
import sys, time
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
url, tag, count, start, offset = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
with Store.open(url) as store:
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


def _spawn(url: str, tag: str, count: int, start: float, offset: float) -> subprocess.Popen[str]:
    env = repo_env()
    return subprocess.Popen([sys.executable, "-c", WRITER, url, tag, str(count), str(start), str(offset)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


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
    committed: list[int] = []
    assert proc.stdout is not None
    deadline = time.time() + 60
    while len(committed) < 300 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed.append(int(line))
    proc.send_signal(signal.SIGKILL)
    rest, err = proc.communicate(timeout=30)
    committed += [int(x) for x in rest.split()]
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
