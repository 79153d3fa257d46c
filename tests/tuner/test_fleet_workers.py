"""Fleet jobs end to end: real worker processes share one job's queue on the real PostgreSQL server (and
on SQLite, the one-host case), with the deterministic cost model. Each key is done exactly once, every
(key, config) is timed once, the winners are those of one single-process run, and a worker killed with
SIGKILL mid-key loses its unit to another worker after the lease."""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.fleet_model import ARCH, KEYS, KV, make_tuner, run_info, worker_main
from flashtune.db.jobs import JobQueue
from flashtune.db.store import Store
from flashtune.tuner.fleet.units import claim_units
from flashtune.tuner.measure import FunctionBench

from helpers import fleet_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One single-process run of every key: per key, the winner and the configs timed."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'single.db'}"
    with Store.open(url) as store:
        results = make_tuner(store, store.start_run(run_info()), FunctionBench(fleet_model.cost)).run(KEYS)
        assert all(r.complete for r in results) and len(results) == len(KEYS)
        return _tuned(store)


def _tuned(store: Store) -> dict:
    winners = {w.key: (w.config, w.median_ms) for w in store.winners(ARCH)}
    timed = Counter((t.key, t.config) for t in store.trials(arch=ARCH))
    return {"winners": winners, "timed": timed}


def _start(url: str, name: str, tmp: Path, count: int, trap_index: int | None = None, lease_s: float = 2.0):
    with Store.open(url) as store:
        JobQueue(store).create(name, ARCH, KV, claim_units(KEYS), lease_s=lease_s, args={}, host="test")
    ctx = mp.get_context("spawn")
    procs, outs = [], []
    for i in range(count):
        out = tmp / f"worker{i}.json"
        trap = str(tmp / "trap.json") if i == trap_index else None
        proc = ctx.Process(target=worker_main, args=(url, name, str(out), f"host{i}", i, trap), daemon=True)
        proc.start()
        procs.append(proc)
        outs.append(out)
    return procs, outs


def _join(procs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.1))
        if proc.is_alive():
            proc.kill()
            pytest.fail(f"worker {proc.pid} still running after {timeout} s")


def _check_job(url: str, name: str, reference: dict, outs: list[Path], *, killed_pid: int | None = None) -> list[dict]:
    reports = [json.loads(out.read_text()) for out in outs]
    finished = Counter(key for report in reports for key, _ in report["keys"])
    with Store.open(url, create=False) as store:
        (status,) = JobQueue(store).status(name)
        assert status.job.status == "done" and status.job.finished_at is not None
        assert status.counts == {"done": len(KEYS), "claimed": 0, "pending": 0}
        assert [k.key for k in status.keys] == KEYS
        tuned = _tuned(store)
    # Each key finished by exactly one worker (the killed one's finished keys are in the table only).
    by_killed = Counter(str(k.key) for k in status.keys if k.worker.pid == killed_pid)
    assert finished + by_killed == Counter(str(k) for k in KEYS)
    # Same answers as the single run: the same winners, and the same candidates timed per key
    # (siblings narrowed to the first bucket's top configs just as there), each (key, config) once.
    assert tuned["winners"] == reference["winners"]
    assert tuned["timed"] == reference["timed"]
    assert max(tuned["timed"].values()) == 1
    return reports


def test_three_worker_processes_finish_a_job_each_key_once(db_url, reference, tmp_path):
    procs, outs = _start(db_url, "three", tmp_path, 3)
    _join(procs)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    reports = _check_job(db_url, "three", reference, outs)
    assert all(r["status"] == "done" for r in reports)
    assert sum(1 for r in reports if r["keys"]) >= 2  # the work was shared, not done by one process


@pytest.mark.postgres
def test_a_worker_killed_mid_key_loses_its_unit_after_the_lease(pg_url, reference, tmp_path):
    procs, outs = _start(pg_url, "killed", tmp_path, 3, trap_index=0)
    trap = tmp_path / "trap.json"
    deadline = time.monotonic() + 60
    while not trap.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert trap.exists(), "the trapped worker never reached its second bucket"
    victim = json.loads(trap.read_text())
    assert victim["pid"] == procs[0].pid
    with Store.open(pg_url, create=False) as store:
        held = [k for k in JobQueue(store).status("killed")[0].keys if k.state == "claimed"
                and k.worker.pid == victim["pid"]]
    assert [str(k.key) for k in held if k.key.batch_heads == 64] == [victim["key"]]
    procs[0].kill()  # SIGKILL: no clean-up, the claim stays until its lease runs out
    _join(procs[1:])
    assert procs[0].exitcode == -9 and [p.exitcode for p in procs[1:]] == [0, 0]
    reports = _check_job(pg_url, "killed", reference, outs[1:], killed_pid=victim["pid"])
    with Store.open(pg_url, create=False) as store:
        status = JobQueue(store).status("killed")[0]
    redone = [k for k in status.keys if str(k.key) == victim["key"]][0]
    assert redone.claims == 2 and redone.worker.pid != victim["pid"]  # taken over, done by another
    assert redone.done_at is not None
    assert all(r["status"] == "done" for r in reports)
