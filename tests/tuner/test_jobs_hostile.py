"""`flashtune jobs` and the job queue against damaged rows, hostile text and odd leases.

Each damage is written with raw SQL (sqlite3 itself on SQLite, so no column type converts it): the
listing names the row by table, id and column in one warning line, skips it, and shows the rest.
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from flashtune.db.jobs import JobError, JobQueue, Worker
from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.tuner.cli import main
from flashtune.tuner.fleet.units import claim_units

from helpers.db import execute_raw

KEYS = [Key("sm_80", "fwd", n, 16, "float32", False, batch_heads=bh) for n in (16, 32) for bh in (1, 2)]
HOSTILE = ["\x1b[31m", "\x1b]0;pwned\x07", "line\nforged", "\u202eevil"]


def _jobs(url: str) -> None:
    """Job 'good' (untouched) and job 'bad' (to be damaged), each with one claimed unit."""
    with Store.open(url) as store:
        queue = JobQueue(store)
        for name in ("good", "bad"):
            job, _ = queue.create(name, "sm_80", "k1", claim_units(KEYS), lease_s=60, args={}, host="h0")
            claim = queue.claim(job, Worker("node-7", 42, 0))
            queue.finish_key(claim, claim.keys[0])


def _no_date(url: str) -> str:
    return "'yesterday'" if url.startswith("sqlite") else "'infinity'"


def _not_a_number(url: str) -> str:
    return "'fast'" if url.startswith("sqlite") else "'NaN'"


# name -> (statement on job 'bad' (its id is :job), table, column)
DAMAGE = {
    "job date": ("UPDATE flashtune_jobs SET created_at = {no_date} WHERE id = :job", "flashtune_jobs", "created_at"),
    "finished date": ("UPDATE flashtune_jobs SET finished_at = {no_date} WHERE id = :job", "flashtune_jobs",
                      "finished_at"),
    "lease": ("UPDATE flashtune_jobs SET lease_s = {nan} WHERE id = :job", "flashtune_jobs", "lease_s"),
    "args": ("UPDATE flashtune_jobs SET args = '[1, 2]' WHERE id = :job", "flashtune_jobs", "args"),
    "unit date": ("UPDATE flashtune_job_units SET lease_until = {no_date} WHERE job_id = :job AND state = 'claimed'",
                  "flashtune_job_units", "lease_until"),
    "key date": ("UPDATE flashtune_job_keys SET done_at = {no_date} WHERE job_id = :job AND state = 'done'",
                 "flashtune_job_keys", "done_at"),
    "missing unit": ("{no_fk}DELETE FROM flashtune_job_units WHERE job_id = :job AND state = 'claimed'",
                     "flashtune_job_keys", "unit_id"),
}


def _damage(url: str, statement: str) -> None:
    with Store.open(url, create=False) as store:
        job_id = JobQueue(store).get("bad").id
    sql = statement.format(no_date=_no_date(url), nan=_not_a_number(url),
                           # PostgreSQL enforces the foreign key; a hand edit with triggers off does not.
                           no_fk="" if url.startswith("sqlite") else "SET LOCAL session_replication_role = replica; ")
    execute_raw(url, sql.replace(":job", str(job_id)) if sql.startswith("SET") else sql,
                None if sql.startswith("SET") else {"job": job_id})


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_row_is_named_and_skipped(db_url: str, damage: str, as_json: bool) -> None:
    _jobs(db_url)
    statement, table, column = DAMAGE[damage]
    _damage(db_url, statement)
    result = CliRunner().invoke(main, ["jobs", "--db", db_url, *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{table} row " in lines[0] and f"column {column}:" in lines[0], result.stderr
    if as_json:
        names = [job["name"] for job in json.loads(result.stdout)]
    else:
        names = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("job ")]
    assert "good" in names
    assert ("bad" in names) == (table != "flashtune_jobs")


@pytest.mark.parametrize("text", HOSTILE, ids=["csi", "osc", "newline", "bidi"])
def test_jobs_never_prints_control_characters(db_url: str, text: str) -> None:
    _jobs(db_url)
    for column, table in (("name", "flashtune_jobs"), ("host", "flashtune_jobs"), ("kernel_version", "flashtune_jobs"),
                          ("host", "flashtune_job_units"), ("host", "flashtune_job_keys")):
        job_column = "id" if table == "flashtune_jobs" else "job_id"
        execute_raw(db_url, f"UPDATE {table} SET {column} = :t || {column} WHERE {job_column} = "
                            "(SELECT id FROM flashtune_jobs WHERE host = 'h0' ORDER BY id DESC LIMIT 1)", {"t": text})
        result = CliRunner().invoke(main, ["jobs", "--db", db_url])
        assert result.exit_code == 0, result.output
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not [line for line in result.stdout.splitlines() if line.startswith(("forged", "evil"))]
        execute_raw(db_url, f"UPDATE {table} SET {column} = substr({column}, :n) WHERE {column} LIKE :p",
                    {"n": len(text) + 1, "p": text + "%"})


def test_a_second_lease_for_a_job_is_refused_naming_both(db_url: str) -> None:
    with Store.open(db_url) as store:
        queue = JobQueue(store)
        queue.create("nightly", "sm_80", "k1", claim_units(KEYS), lease_s=60, args={}, host="h0")
        with pytest.raises(JobError, match=r"job nightly already exists .* with lease 60 s, not 120 s"):
            queue.create("nightly", "sm_80", "k1", claim_units(KEYS), lease_s=120, args={}, host="h0")
        job, created = queue.create("nightly", "sm_80", "k1", claim_units(KEYS), lease_s=60, args={}, host="h0")
        assert not created and job.lease_s == 60


def test_a_lease_later_than_the_job_allows_counts_as_expired(db_url: str) -> None:
    with Store.open(db_url) as store:
        queue = JobQueue(store)
        job, _ = queue.create("stuck", "sm_80", "k1", claim_units(KEYS), lease_s=60, args={}, host="h0")
        held = queue.claim(job, Worker("gone", 1, 0))
        far = "'9999-12-31 00:00:00.000000'" if db_url.startswith("sqlite") else "'9999-12-31 00:00:00+00'"
        execute_raw(db_url, f"UPDATE flashtune_job_units SET lease_until = {far} WHERE id = :u", {"u": held.unit_id})
        [status] = queue.status("stuck")
        assert {k.state for k in status.keys if k.key in held.keys} == {"pending"}
        taken = []
        while (claim := queue.claim(job, Worker("alive", 2, 0))) is not None:
            taken.append(claim.unit_id)
            for key in claim.keys:
                queue.finish_key(claim, key)
        assert held.unit_id in taken
        assert queue.remaining(job) == 0
        # A lease within the job's lease time is still a lease.
        again, _ = queue.create("fine", "sm_80", "k1", claim_units(KEYS), lease_s=60, args={}, host="h0")
        first = queue.claim(again, Worker("a", 1, 0))
        second = queue.claim(again, Worker("b", 2, 0))
        assert first is not None and second is not None and first.unit_id != second.unit_id
        assert timedelta(seconds=again.lease_s) == timedelta(minutes=1)
