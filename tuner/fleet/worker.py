"""One GPU's share of a fleet job: claim a unit, tune its keys, mark each done, repeat until the job is done.

The lease of the unit in hand is renewed by a heartbeat thread every quarter of the job's lease
time, so a worker holds its unit however long a key takes and loses it only by dying (or by losing
the database for a whole lease). A worker that finds nothing to claim while other workers still
hold units waits and looks again: one of them may die, and its unit must be taken over after the
lease. The tuning itself is `tune_unit(keys, should_stop)`, the session's tuning loop in production
and a cost-model loop in tests.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...db.errors import StoreError
from ...db.jobs import Claim, Job, JobQueue, Worker
from ...db.types import Key
from ..loop import KeyResult

TuneUnit = Callable[[Sequence[Key], Callable[[], bool]], Sequence[KeyResult]]


@dataclass
class WorkResult:
    """What one worker did: the keys it finished (their results), why it stopped ('done': the job is
    finished; 'budget'; 'interrupted'), the units it claimed, and the claims it lost to an expired lease."""

    results: list[KeyResult] = field(default_factory=list)
    status: str = "done"
    claims: int = 0
    lost: int = 0


class Heartbeat:
    """Renews a claim's lease in a background thread while the unit is worked on; `lost` turns True
    when the unit turned out to be someone else's (the lease ran out and another worker took it)."""

    def __init__(self, queue: JobQueue, claim: Claim) -> None:
        self.queue, self.claim = queue, claim
        self.lost = False
        self._interval = max(claim.job.lease_s / 4, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"flashtune-lease-{claim.unit_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self.queue.renew(self.claim):
                    self.lost = True
                    return
            except StoreError:
                pass  # the database is away for a moment: try again; a lapsed lease shows at the next renew

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def work(queue: JobQueue, job: Job, worker: Worker, tune_unit: TuneUnit, *,
         should_stop: Callable[[], bool] = lambda: False, budget_s: float | None = None,
         on_claim: Callable[[Claim], None] | None = None,
         clock: Callable[[], float] = time.monotonic) -> WorkResult:
    """Work on `job` as `worker` until it is finished, `should_stop()` (Ctrl-C) or `budget_s` has passed.
    A unit left unfinished by a stop is released at once, so another worker can take it."""
    started = clock()
    outcome = WorkResult()

    def stop_reason() -> str | None:
        if should_stop():
            return "interrupted"
        if budget_s is not None and clock() - started >= budget_s:
            return "budget"
        return None

    poll_s = min(max(job.lease_s / 4, 0.05), 5.0)
    prefer: int | None = None
    while (reason := stop_reason()) is None:
        claim = queue.claim(job, worker, prefer_family=prefer)
        if claim is None:
            if queue.remaining(job) == 0:
                return outcome
            _sleep(poll_s, lambda: stop_reason() is not None)  # others hold the rest: one may die
            continue
        outcome.claims += 1
        prefer = claim.family
        if on_claim is not None:
            on_claim(claim)
        _work_unit(queue, claim, tune_unit, stop_reason, outcome)
    outcome.status = reason
    return outcome


def _work_unit(queue: JobQueue, claim: Claim, tune_unit: TuneUnit, stop_reason: Callable[[], str | None],
               outcome: WorkResult) -> None:
    """Tune one claimed unit and mark its finished keys; release it unless every key got done."""
    finished = False
    try:
        with Heartbeat(queue, claim) as beat:
            # Keys an earlier holder finished go through the loop too: they cost a read, and their stored
            # trials give their siblings the ranking a single run would have used.
            results = tune_unit(claim.keys, lambda: beat.lost or stop_reason() is not None)
        # The loop tunes a composed key's parts before it (the training pair's fwd and bwd keys): they are
        # other units' keys, which their own holders mark.
        results = [r for r in results if r.key in claim.keys]
        lost = beat.lost
        for result in results:
            if lost:
                break
            if not result.complete:
                continue
            if queue.finish_key(claim, result.key):
                if result.key not in claim.done:
                    outcome.results.append(result)
            else:
                lost = True
        if lost:
            outcome.lost += 1
        finished = lost or all(r.complete for r in results) and {r.key for r in results} >= set(claim.keys)
    finally:
        if not finished:
            try:
                queue.release(claim)
            except StoreError:
                pass  # the lease runs out instead


def _sleep(seconds: float, wake: Callable[[], bool]) -> None:
    """Sleep `seconds`, waking early when `wake()` (Ctrl-C) turns True."""
    end = time.monotonic() + seconds
    while not wake() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
