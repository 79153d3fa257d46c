"""The fleet queue (`flashtune.db.jobs`) on a real SQLite file and the real PostgreSQL server: claims,
lease expiry and take-over, the token that keeps a key done exactly once, a finished job, job names."""
from __future__ import annotations

import time

import pytest

from flashtune.db.jobs import JobError, JobQueue, Worker
from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.tuner.fleet.units import claim_units
from flashtune.tuner.fleet.worker import work

A, B = Worker("node-a", 101, 0, "H200"), Worker("node-b", 202, 1, "H200")
KEYS = [Key("sm_90", "fwd", n, d, "float16", False, batch_heads=bh) for d in (64, 128) for n in (128, 256)
        for bh in (16, 64)]


@pytest.fixture
def queue(db_url):
    store = Store.open(db_url)
    yield JobQueue(store)
    store.close()


def make(queue: JobQueue, name: str = "job", lease_s: float = 0.5):
    job, created = queue.create(name, "sm_90", "kv1", claim_units(KEYS), lease_s=lease_s, args={"kernel_only": False},
                                host="test")
    assert created
    return job


def test_units_are_sibling_classes_and_claims_never_overlap(queue):
    job = make(queue)
    first, second = queue.claim(job, A), queue.claim(job, B)
    # A unit is a sibling class (the buckets of one key), in queue order; B takes another family.
    assert first.keys == tuple(KEYS[0:2]) and first.claims == 1 and first.done == frozenset()
    assert second.keys == tuple(KEYS[4:6]) and second.family != first.family
    # A's next claim stays in its family (its kernels are compiled).
    third = queue.claim(job, A, prefer_family=first.family)
    assert third.keys == tuple(KEYS[2:4])
    fourth = queue.claim(job, B, prefer_family=second.family)
    assert fourth.keys == tuple(KEYS[6:8])
    assert queue.claim(job, A) is None  # all held under live leases
    counts = queue.status("job")[0].counts
    assert counts == {"done": 0, "claimed": 8, "pending": 0}


def test_lease_expiry_hands_the_unit_to_another_worker(queue):
    job = make(queue, lease_s=0.5)
    mine = queue.claim(job, A)
    assert queue.finish_key(mine, mine.keys[0])
    for _ in range(3):  # renewed: the lease holds past its first term
        time.sleep(0.25)
        assert queue.renew(mine)
    assert all(c.keys != mine.keys for c in [queue.claim(job, B) for _ in range(3)])
    time.sleep(0.7)  # A stops renewing (killed): its lease runs out
    taken = queue.claim(job, B, prefer_family=mine.family)
    assert taken.unit_id == mine.unit_id and taken.claims == 2
    assert taken.done == {mine.keys[0]}  # what A finished stays done
    # A is too late for everything: no renewal, no key marked, no release of B's claim.
    assert not queue.renew(mine) and not queue.finish_key(mine, mine.keys[1]) and not queue.release(mine)
    entry = {k.key: k for k in queue.status("job")[0].keys}[mine.keys[1]]
    assert entry.state == "claimed" and entry.worker == Worker(B.host, B.pid, B.gpu, B.gpu_name)
    assert queue.finish_key(taken, taken.keys[1])
    entries = {k.key: k for k in queue.status("job")[0].keys}
    assert entries[mine.keys[0]].worker.host == "node-a" and entries[mine.keys[1]].worker.host == "node-b"


def test_released_unit_is_claimable_at_once_and_the_job_is_done_with_its_last_key(queue):
    job = make(queue, lease_s=600)
    held = queue.claim(job, A)
    assert queue.release(held)
    b = queue.claim(job, B)
    assert b.unit_id == held.unit_id  # no lease wait after a release
    while (claim := queue.claim(job, A)) is not None:
        for key in claim.keys:
            assert queue.finish_key(claim, key)
    assert queue.remaining(job) == 1 and queue.get("job").status == "open"  # B's unit, under a live lease
    assert queue.finish_key(b, b.keys[0]) and queue.get("job").status == "open"
    assert queue.finish_key(b, b.keys[1])
    assert queue.get("job").status == "done" and queue.remaining(job) == 0


def test_joining_a_finished_job_claims_nothing_and_times_nothing(queue):
    job = make(queue)
    while (claim := queue.claim(job, A)) is not None:
        for key in claim.keys:
            assert queue.finish_key(claim, key)
    finished = queue.get("job")
    assert finished.status == "done" and finished.finished_at is not None and queue.remaining(finished) == 0
    calls = []
    result = work(queue, finished, B, lambda keys, stop: calls.append(keys) or [])
    assert result.status == "done" and result.claims == 0 and result.results == [] and calls == []


def test_same_job_again_is_joined_and_a_different_one_refused(queue):
    job = make(queue)
    again, created = queue.create("job", "sm_90", "kv1", claim_units(KEYS), lease_s=0.5,
                                  args={"kernel_only": False}, host="other")
    assert not created and again.id == job.id
    with pytest.raises(JobError, match="already exists .* other keys: join it with --join job"):
        queue.create("job", "sm_90", "kv1", claim_units(KEYS[:4]), lease_s=0.5, args={"kernel_only": False}, host="x")
    with pytest.raises(JobError, match="other kernel version, options"):
        queue.create("job", "sm_90", "kv2", claim_units(KEYS), lease_s=0.5, args={"kernel_only": True}, host="x")
    for bad in ("", "-x", "a b", "x" * 65, "j\n"):
        with pytest.raises(JobError, match="not usable"):
            queue.create(bad, "sm_90", "kv1", claim_units(KEYS), lease_s=1, args={}, host="x")
    with pytest.raises(JobError, match="no job missing"):
        queue.get("missing")
    assert [s.job.name for s in queue.status()] == ["job"]


@pytest.mark.postgres
def test_two_workers_finishing_the_last_two_units_at_once_close_the_job(pg_url):
    """Each finisher's count of units left runs before the other commits: without a lock on the job
    row both would see the other's unit claimed, and the job would stay open with every key done."""
    import threading

    from sqlalchemy import create_engine

    from flashtune.db.jobs import finish_key_in

    with Store.open(pg_url) as store:
        queue = JobQueue(store)
        job = make(queue, lease_s=600)
        claims = [queue.claim(job, A), queue.claim(job, B), queue.claim(job, A), queue.claim(job, B)]
        for claim in claims[2:]:
            for key in claim.keys:
                assert queue.finish_key(claim, key)
        for claim in claims[:2]:
            assert queue.finish_key(claim, claim.keys[0])
        engine = create_engine(pg_url)
        try:
            with engine.connect() as first, engine.connect() as second:
                first.begin()
                assert finish_key_in(first, claims[0], claims[0].keys[1])  # not committed yet
                done: list[bool] = []

                def finish_second() -> None:
                    with second.begin():
                        done.append(finish_key_in(second, claims[1], claims[1].keys[1]))

                thread = threading.Thread(target=finish_second)
                thread.start()
                thread.join(0.5)
                assert thread.is_alive(), "the second finisher did not wait for the first one's commit"
                first.commit()
                thread.join(10)
                assert done == [True]
        finally:
            engine.dispose()
        assert queue.remaining(job) == 0
        finished = queue.get("job")
        assert finished.status == "done" and finished.finished_at is not None
