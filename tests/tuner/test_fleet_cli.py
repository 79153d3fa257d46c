"""Fleet tuning from the command line: `tune --gpus/--job/--join` (bad values, SQLite's limit, a finished
job, a whole two-GPU run through the real spawned benchmark workers) and `flashtune jobs`.

This machine has no GPU: where a test gets past the GPU check, GPU detection answers with stand-ins
(the only thing stubbed); the benchmark workers are the real spawned processes running the kernel
under the Triton interpreter, as in test_tuner_cli.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import flashtune.tuner.fleet.command as fleet_command
import flashtune.tuner.gpu
from flashtune.db.jobs import JobQueue, Worker
from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.kernel.version import KERNEL_VERSION
from flashtune.tuner.cli import main
from flashtune.tuner.fleet.gpus import select_gpus
from flashtune.tuner.fleet.units import claim_units
from flashtune.tuner.gpu import planned_gpu
from helpers.cli import one_line_error
from helpers.subproc import repo_env

STAND_IN = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=8192, present=True)
TINY = ["--head-dim", "16", "--dtype", "fp32", "--no-causal", "--batch-heads", "1", "--kernel-only"]
KEYS = [Key("sm_80", "fwd", n, 16, "float32", False, batch_heads=bh) for n in (16, 32) for bh in (1, 2)]


def tune(*args: str):
    return CliRunner().invoke(main, ["tune", *args])




@pytest.fixture
def two_gpus(monkeypatch):
    """Two stand-in GPUs (indices 0 and 1); everything else is real."""
    monkeypatch.setattr(fleet_command, "gpu_count", lambda: 2)
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: dataclasses.replace(STAND_IN, index=index))


@pytest.mark.parametrize("value, needle", [
    ("", "--gpus: empty"), ("x", "--gpus: 'x' is not a GPU index"), ("0,0", "--gpus: GPU 0 is listed twice"),
    ("-1", "'-1' is not a GPU index"), ("0,,1", "'' is not a GPU index"), ("1.5", "'1.5' is not a GPU index"),
])
def test_bad_gpus_values_are_one_line_and_write_nothing(tmp_path, value, needle):
    db = tmp_path / "x.db"
    one_line_error(tune("--gpus", value, "--db", f"sqlite:///{db}"), needle)
    assert not db.exists()


def test_a_gpu_index_this_host_lacks_is_one_line_and_writes_nothing(two_gpus, tmp_path):
    db = tmp_path / "x.db"
    one_line_error(tune("--gpus", "0,5", *TINY, "--db", f"sqlite:///{db}"),
                   "--gpus: GPU 5 does not exist: this host has 2 CUDA GPU(s), indices 0 to 1")
    assert not db.exists()
    assert select_gpus(None, 3) == [0, 1, 2] and select_gpus([2, 0], 3) == [2, 0]
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        select_gpus(None, 0)


def test_join_on_sqlite_says_sqlite_cannot_share_a_queue(tmp_path):
    db = tmp_path / "x.db"
    one_line_error(tune("--join", "j", "--db", f"sqlite:///{db}"),
                   "--join:", "SQLite cannot share a queue across hosts", "tune --gpus all", "PostgreSQL")
    assert not db.exists()


def test_two_gpus_share_one_queue_and_store_every_key(two_gpus, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    result = CliRunner().invoke(main, ["tune", "--seq", "16,32", *TINY, "--gpus", "all", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "done" and summary["keys_planned"] == 2
    assert [k["key"] for k in summary["keys"]] == ["sm_80/fwd/N=16/D=16/float32/full/BH=1",
                                                   "sm_80/fwd/N=32/D=16/float32/full/BH=1"]
    assert all(k["complete"] and k["winner"] for k in summary["keys"])
    assert sorted(g["index"] for g in summary["gpus"]) == [0, 1] and sum(g["keys"] for g in summary["gpus"]) == 2
    [job] = summary["jobs"]
    with Store.open(url, create=False) as store:
        [status] = JobQueue(store).status(job)
        assert status.job.status == "done" and status.counts["done"] == 2
        assert {w.key.seq_len for w in store.winners("sm_80")} == {16, 32}
        trials = store.trials()
        runs = {t.run_id for t in trials}
    assert len({(t.key, t.config) for t in trials}) == len(trials)  # each (key, config) timed once
    assert runs <= {g["run_id"] for g in summary["gpus"]}


@pytest.mark.postgres
def test_joining_a_finished_job_does_nothing_and_needs_no_gpu(pg_url):
    with Store.open(pg_url) as store:
        queue = JobQueue(store)
        job, _ = queue.create("done-job", "sm_80", KERNEL_VERSION, claim_units(KEYS), lease_s=60, args={}, host="h")
        while (claim := queue.claim(job, Worker("h", 1, 0))) is not None:
            for key in claim.keys:
                queue.finish_key(claim, key)
    result = tune("--join", "done-job", "--db", pg_url)
    assert result.exit_code == 0, result.output
    assert "job done-job is finished: every key is done, nothing to tune" in result.output
    with Store.open(pg_url, create=False) as store:
        assert store.counts()["runs"] == 0  # no run started, nothing timed
    one_line_error(tune("--join", "done-job", "--db", pg_url, "--seq", "128"), "--join: the job holds the keys",
                   "drop --seq")
    one_line_error(tune("--join", "nope", "--db", pg_url), "no job nope in")


@pytest.mark.postgres
def test_join_refuses_another_kernel_version(pg_url, two_gpus):
    with Store.open(pg_url) as store:
        JobQueue(store).create("old", "sm_80", "0ld", claim_units(KEYS), lease_s=60, args={}, host="h")
    one_line_error(tune("--join", "old", "--db", pg_url), "job old tunes kernel version 0ld", KERNEL_VERSION)


def test_jobs_command_shows_done_claimed_and_pending(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with Store.open(url) as store:
        queue = JobQueue(store)
        job, _ = queue.create("nightly", "sm_80", KERNEL_VERSION, claim_units(KEYS), lease_s=60, args={}, host="h0")
        claim = queue.claim(job, Worker("node-7", 4242, 1, "H200"))
        queue.finish_key(claim, KEYS[0])
    # The real console script, in a fresh process.
    flashtune = Path(sys.executable).with_name("flashtune")
    done = subprocess.run([str(flashtune), "jobs", "--db", url], capture_output=True, text=True, env=repo_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("job nightly (open): sm_80") and "1 done, 1 claimed, 2 pending of 4 keys" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows[str(KEYS[0])][:2] == ["done", "node-7/4242/gpu1"]
    assert rows[str(KEYS[1])][:2] == ["claimed", "node-7/4242/gpu1"] and "left" in lines[4]
    assert rows[str(KEYS[2])] == ["pending"] and rows[str(KEYS[3])] == ["pending"]
    as_json = subprocess.run([str(flashtune), "jobs", "nightly", "--db", url, "--json"], capture_output=True, text=True,
                             env=repo_env(), timeout=120)
    [entry] = json.loads(as_json.stdout)
    assert entry["counts"] == {"done": 1, "claimed": 1, "pending": 2} and entry["status"] == "open"
    states = [(k["state"], k["by"]) for k in entry["keys"]]
    by = {"host": "node-7", "pid": 4242, "gpu": 1, "gpu_name": None}
    assert states == [("done", by), ("claimed", {**by, "gpu_name": "H200"}), ("pending", None), ("pending", None)]
    missing = CliRunner().invoke(main, ["jobs", "other", "--db", url])
    one_line_error(missing, "no job other in")
    empty = CliRunner().invoke(main, ["jobs", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    one_line_error(empty, "no file at")
