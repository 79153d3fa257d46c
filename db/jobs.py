"""Fleet jobs: a job's keys as a work queue that tuning workers on any number of hosts claim.

A job (`flashtune_jobs`) holds one arch's keys, cut into *units* (`flashtune_job_units`): the keys one
claim takes, in the order they should be tuned. A worker claims the first claimable unit with
`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL (workers never wait for each other's row locks and
never take the same unit), in an IMMEDIATE transaction on SQLite (one host: the write lock serialises
claims). A claim carries a random token and a lease; the worker renews the lease while it works
(`renew`), marks each key done with the token (`finish_key`), and a unit whose lease has run out is
claimable again: a worker killed with SIGKILL, or a host that lost power, loses its unit after the
lease time and another worker takes it. Every write checks the token, so a worker whose unit was
taken over can no longer mark its keys: each key is done exactly once.

Times are the database server's on PostgreSQL (hosts' clocks may differ; the server's is the one
every lease is compared against) and this host's on SQLite (one host). Imports neither torch nor
triton.
"""
from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Hashable, Mapping, Sequence

from sqlalchemy import Connection, Text, and_, case, cast, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import aliased

from .errors import DatabaseCorruptError, SchemaVersionError
from .models import FEATURE_SINCE, KEY_COLUMNS, JobKeyRow, JobRow, JobUnitRow, utcnow
from .rows import Check, Decoder, RowSpec, int32, key_values, label, number, when
from .schema import MIGRATE_COMMAND
from .store import Store
from .text import printable, shown
from .types import InvalidField, Key

__all__ = ["Claim", "Job", "JobError", "JobKey", "JobQueue", "JobStatus", "Worker", "check_job_name"]

_JOBS, _UNITS, _KEYS = JobRow.__table__, JobUnitRow.__table__, JobKeyRow.__table__
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MIN_LEASE_S, MAX_LEASE_S = 0.1, 86400.0


class JobError(ValueError):
    """A job that does not exist, exists with other keys, or cannot be made as asked (bad input)."""


def check_job_name(name: Any) -> str:
    """`name` if it is a job name: 1 to 64 letters, digits and `._:-`, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise JobError(f"job name {printable(shown(name))} is not usable: 1 to 64 letters, digits and "
                       "'._:-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Worker:
    """Who claims: the host, the process id and the GPU (its index on that host, and its name)."""

    host: str
    pid: int
    gpu: int | None = None
    gpu_name: str = ""

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}" + ("" if self.gpu is None else f"/gpu{self.gpu}")


@dataclass(frozen=True)
class Job:
    """A job as stored."""

    id: int
    name: str
    arch: str
    kernel_version: str
    lease_s: float
    args: Mapping[str, Any]
    status: str  # 'open' | 'done'
    host: str
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Claim:
    """A unit held by one worker: its keys in tuning order, those already done (by an earlier holder
    whose lease ran out), and how many times the unit has been claimed, this claim included."""

    job: Job
    unit_id: int
    token: str
    worker: Worker
    family: int
    keys: tuple[Key, ...]
    done: frozenset[Key]
    claims: int


@dataclass(frozen=True)
class JobKey:
    """One key of a job as `flashtune jobs` shows it: 'done' (by `worker`), 'claimed' (by `worker`,
    lease ending in `lease_left_s`) or 'pending'. `claims`: how often its unit was claimed."""

    key: Key
    state: str
    worker: Worker | None
    lease_left_s: float | None
    done_at: datetime | None
    claims: int


@dataclass(frozen=True)
class JobStatus:
    """A job and each of its keys, in queue order."""

    job: Job
    keys: tuple[JobKey, ...]

    @property
    def counts(self) -> dict[str, int]:
        """How many keys are done, claimed and pending."""
        counted = Counter(k.state for k in self.keys)
        return {state: counted.get(state, 0) for state in ("done", "claimed", "pending")}


def _now(conn: Connection) -> datetime:
    """The time leases are measured in: the server's clock on PostgreSQL, this host's on SQLite."""
    if conn.dialect.name == "postgresql":
        return conn.execute(select(func.now())).scalar_one()
    return utcnow()


def _one_of(*allowed: str) -> Check:
    """One of `allowed` (a state)."""
    def check(value: Any) -> str:
        if value in allowed:
            return value
        raise ValueError(f"{printable(shown(value))} is not one of {', '.join(allowed)}")
    return check


_POSITIVE = number(positive=True)


def _lease(value: Any) -> float:
    lease = _POSITIVE(value)
    if not MIN_LEASE_S <= lease <= MAX_LEASE_S:
        raise ValueError(f"lease {lease:g} s is not from {MIN_LEASE_S} to {MAX_LEASE_S:.0f} seconds")
    return lease


def _args(value: Any) -> dict[str, Any]:
    """The job's options: a JSON object (read as text, so that a damaged value reaches this check)."""
    if value is None:
        return {}
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError):
        raise ValueError(f"not valid JSON: {printable(shown(value))}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"JSON {type(parsed).__name__}, not an object: {printable(shown(value))}")
    return parsed


def _text(table: Any, column: str, *, required: bool = False, nullable: bool = False) -> Check:
    return label(table.c[column].type.length, required=required, nullable=nullable)


def _unit_present(values: Mapping[str, Any]) -> tuple[str, str] | None:
    if values["its unit"] is None:
        return "unit_id", f"unit {values['unit_id']} is not in {_UNITS.name}"
    return None


# How `flashtune jobs` and the queue read rows (db.rows): a damaged row is named and skipped.
_JOB_SPEC = RowSpec(_JOBS.name, key=False, config=False, columns=(
    ("name", _text(_JOBS, "name", required=True)), ("arch", _text(_JOBS, "arch", required=True)),
    ("kernel_version", _text(_JOBS, "kernel_version", required=True)), ("lease_s", _lease), ("args", _args),
    ("status", _one_of("open", "done")), ("host", _text(_JOBS, "host")), ("created_at", when()),
    ("finished_at", when(nullable=True))))
_UNIT_SPEC = RowSpec(_UNITS.name, key=False, config=False, columns=(
    ("state", _one_of("pending", "claimed", "done")), ("host", _text(_UNITS, "host", nullable=True)),
    ("pid", int32(nullable=True)), ("gpu", int32(nullable=True)),
    ("gpu_name", _text(_UNITS, "gpu_name", nullable=True)), ("lease_until", when(nullable=True)),
    ("claims", int32())))
_KEY_SPEC = RowSpec(_KEYS.name, key=True, config=False, columns=(
    ("unit_id", int32()), ("state", _one_of("pending", "done")), ("host", _text(_KEYS, "host", nullable=True)),
    ("pid", int32(nullable=True)), ("gpu", int32(nullable=True)), ("done_at", when(nullable=True)),
    ("its unit", int32(nullable=True))), rule=_unit_present)
_JOB_COLUMNS = [cast(c, Text).label(c.name) if c.name == "args" else c
                for c in (_JOBS.c[name] for name in _JOB_SPEC.names)]
_UNIT_COLUMNS = [_UNITS.c[name] for name in _UNIT_SPEC.names]
_KEY_COLUMNS = [*(_KEYS.c[name] for name in _KEY_SPEC.names[:-1]), _UNITS.c.id.label("its_unit")]


@dataclass(frozen=True)
class _Unit:
    state: str
    host: str | None
    pid: int | None
    gpu: int | None
    gpu_name: str | None
    lease_until: datetime | None
    claims: int


def _read_job(conn: Connection, name: str, where: str) -> Job | None:
    """Job `name`, None when there is none; DatabaseCorruptError naming the row when it is damaged."""
    row = conn.execute(select(*_JOB_COLUMNS).where(_JOBS.c.name == name)).first()
    if row is None:
        return None
    decoder = Decoder(_JOB_SPEC)
    values = decoder.values(row)
    if values is None:
        raise DatabaseCorruptError(f"database {where}: {decoder.damaged[0]}; fix or delete the job")
    return Job(*values)


def _key(row: Any, where: str) -> Key:
    try:
        return Key(**{c: getattr(row, c) for c in KEY_COLUMNS})
    except (InvalidField, TypeError, ValueError) as exc:
        raise DatabaseCorruptError(f"database {where}: {_KEYS.name} row {row.id} holds no valid key "
                                   f"({printable(exc, 200)})") from None


def _insert(dialect: str) -> Any:
    return pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert


JOBS_SINCE = 3  # the schema version that added the job tables


class JobQueue:
    """The jobs of one store: create them, claim their units, renew and release claims, mark keys done,
    and report where each job stands."""

    def __init__(self, store: Store) -> None:
        if store.schema_version < JOBS_SINCE:  # a read-only open of a schema-2 database gets here
            raise SchemaVersionError(f"database {store.display_url} has schema version {store.schema_version}, "
                                     f"which has no job tables (they came with version {JOBS_SINCE}): run "
                                     f"`{MIGRATE_COMMAND} --db URL` to migrate it")
        complete = max(FEATURE_SINCE.values())
        if store.schema_version < complete:  # a read-only open of an older database
            raise SchemaVersionError(f"database {store.display_url} has schema version {store.schema_version}, "
                                     f"whose job keys lack key columns of version {complete}: "
                                     f"run `{MIGRATE_COMMAND} --db URL` to migrate it")
        self.store = store

    # --- jobs ------------------------------------------------------------------------------

    def create(self, name: str, arch: str, kernel_version: str, units: Sequence[tuple[Hashable, Sequence[Key]]], *,
               lease_s: float, args: Mapping[str, Any], host: str) -> tuple[Job, bool]:
        """Create job `name` with `units`, each (family, keys), in queue order; (the job, whether it was
        created). A job of that name with the same arch, kernel version, arguments and keys is
        returned as it is (running the same command again joins it); with anything else, JobError."""
        check_job_name(name)
        if not (isinstance(lease_s, (int, float)) and MIN_LEASE_S <= lease_s <= MAX_LEASE_S):
            raise JobError(f"lease must be from {MIN_LEASE_S} to {MAX_LEASE_S:.0f} seconds, got {shown(lease_s)}")
        keys = [key for _, unit in units for key in unit]
        if not keys or any(not unit for _, unit in units):
            raise JobError(f"job {name}: a job needs keys, and every unit at least one")
        if len(set(keys)) != len(keys):
            raise JobError(f"job {name}: a key is listed twice")
        if any(key.arch != arch for key in keys):
            raise JobError(f"job {name} is for {arch}: every key must be")
        families: dict[Hashable, int] = {}
        args = dict(args)

        def make(conn: Connection) -> tuple[Job, bool]:
            now = _now(conn)
            insert = _insert(conn.dialect.name)(_JOBS).values(
                name=name, arch=arch, kernel_version=kernel_version, lease_s=float(lease_s), args=args,
                status="open", host=host, created_at=now)
            job_id = conn.execute(insert.on_conflict_do_nothing(index_elements=["name"])
                                  .returning(_JOBS.c.id)).scalar()
            if job_id is None:  # it exists: the same job, or a clash of names
                return self._existing(conn, name, arch, kernel_version, float(lease_s), args, keys), False
            position = 0
            for unit_position, (family, unit) in enumerate(units):
                unit_id = conn.execute(_UNITS.insert().values(
                    job_id=job_id, position=unit_position, family=families.setdefault(family, len(families)),
                    state="pending", claims=0).returning(_UNITS.c.id)).scalar_one()
                rows = []
                for key in unit:
                    rows.append({**dict(zip(KEY_COLUMNS, key_values(key))), "job_id": job_id, "unit_id": unit_id,
                                 "position": position, "state": "pending"})
                    position += 1
                conn.execute(_KEYS.insert(), rows)
            job = _read_job(conn, name, self.store.display_url)
            assert job is not None  # inserted just now, in this transaction
            return job, True

        return self.store.transaction(f"creating job {name}", make)

    def _existing(self, conn: Connection, name: str, arch: str, kernel_version: str, lease_s: float,
                  args: Mapping[str, Any], keys: Sequence[Key]) -> Job:
        job = _read_job(conn, name, self.store.display_url)
        if job is None:  # deleted since the insert found it
            raise JobError(f"job {name} was deleted while it was being created; run the command again")
        if job.lease_s != lease_s:
            raise JobError(f"job {name} already exists in {self.store.display_url} with lease {job.lease_s:g} s, "
                           f"not {lease_s:g} s: give --lease {job.lease_s:g}, join it with --join {name}, "
                           "or pick another name")
        stored = [_key(row, self.store.display_url) for row in
                  conn.execute(select(_KEYS).where(_KEYS.c.job_id == job.id).order_by(_KEYS.c.position))]
        differs = [what for what, same in (("arch", job.arch == arch), ("kernel version", job.kernel_version ==
                   kernel_version), ("options", dict(job.args) == dict(args)), ("keys", stored == list(keys)))
                   if not same]
        if differs:
            raise JobError(f"job {name} already exists in {self.store.display_url} with other "
                           f"{', '.join(differs)}: join it with --join {name}, or pick another name")
        return job

    def get(self, name: str) -> Job:
        """The job called `name`; JobError when there is none."""
        check_job_name(name)
        job = self.store.transaction("reading jobs", lambda conn: _read_job(conn, name, self.store.display_url),
                                     write=False)
        if job is None:
            raise JobError(f"no job {name} in {self.store.display_url} (`flashtune jobs` lists them)")
        return job

    def remaining(self, job: Job) -> int:
        """Units of `job` not done yet (claimed ones included)."""
        return self.store.transaction("reading a job", lambda conn: conn.execute(
            select(func.count()).select_from(_UNITS).where(_UNITS.c.job_id == job.id, _UNITS.c.state != "done")
        ).scalar_one(), write=False)

    # --- claims ----------------------------------------------------------------------------

    def claim(self, job: Job, worker: Worker, *, prefer_family: int | None = None) -> Claim | None:
        """Claim the next unit of `job` for `worker`, or None when every unit is done or held under a live
        lease. Order: a unit of `prefer_family` (the worker's last one: its kernels are compiled), then a
        unit of a family nobody is working on, then queue order. An expired claim is taken over."""
        def take(conn: Connection) -> Claim | None:
            now = _now(conn)
            latest = now + timedelta(seconds=job.lease_s)
            other = aliased(_UNITS)
            busy = exists(select(other.c.id).where(
                other.c.job_id == job.id, other.c.family == _UNITS.c.family, other.c.id != _UNITS.c.id,
                other.c.state == "claimed", other.c.lease_until >= now, other.c.lease_until <= latest))
            # A lease ending later than the job's lease time allows (a clock far ahead, a row edited by
            # hand, year 9999) is no lease: the unit would stay held forever.
            claimable = or_(_UNITS.c.state == "pending",
                            and_(_UNITS.c.state == "claimed",
                                 or_(_UNITS.c.lease_until.is_(None), _UNITS.c.lease_until < now,
                                     _UNITS.c.lease_until > latest)))
            order = [case((busy, 1), else_=0), _UNITS.c.position]
            if prefer_family is not None:
                order.insert(0, case((_UNITS.c.family == prefer_family, 0), else_=1))
            row = conn.execute(select(_UNITS.c.id, _UNITS.c.family, _UNITS.c.claims)
                               .where(_UNITS.c.job_id == job.id, claimable).order_by(*order).limit(1)
                               .with_for_update(skip_locked=True, of=_UNITS)).first()
            if row is None:
                return None
            token = uuid.uuid4().hex
            conn.execute(update(_UNITS).where(_UNITS.c.id == row.id).values(
                state="claimed", claim_token=token, host=worker.host, pid=worker.pid, gpu=worker.gpu,
                gpu_name=worker.gpu_name, lease_until=now + timedelta(seconds=job.lease_s),
                claims=row.claims + 1, claimed_at=now))
            keys, done = [], set()
            for key_row in conn.execute(select(_KEYS).where(_KEYS.c.unit_id == row.id).order_by(_KEYS.c.position)):
                key = _key(key_row, self.store.display_url)
                keys.append(key)
                if key_row.state == "done":
                    done.add(key)
            return Claim(job, row.id, token, worker, row.family, tuple(keys), frozenset(done), row.claims + 1)

        return self.store.transaction(f"claiming work of job {job.name}", take)

    def renew(self, claim: Claim) -> bool:
        """Extend the claim's lease by the job's lease time from now; False when the unit is no longer
        this claim's (its lease ran out and another worker took it, or it was released)."""
        def extend(conn: Connection) -> bool:
            now = _now(conn)
            return conn.execute(update(_UNITS).where(
                _UNITS.c.id == claim.unit_id, _UNITS.c.claim_token == claim.token, _UNITS.c.state == "claimed")
                .values(lease_until=now + timedelta(seconds=claim.job.lease_s))).rowcount == 1

        return self.store.transaction(f"renewing a claim of job {claim.job.name}", extend)

    def finish_key(self, claim: Claim, key: Key) -> bool:
        """Mark `key` of the claimed unit done (the unit, and the job, too when it was the last); False,
        with nothing written, when the unit is no longer this claim's."""
        if key not in claim.keys:
            raise ValueError(f"{key} is not a key of unit {claim.unit_id} of job {claim.job.name}")
        return self.store.transaction(f"finishing a key of job {claim.job.name}",
                                      lambda conn: finish_key_in(conn, claim, key))

    def release(self, claim: Claim) -> bool:
        """Give the unit back at once (the worker stops early: Ctrl-C, its budget); whether it was still
        this claim's."""
        statement = (update(_UNITS).where(_UNITS.c.id == claim.unit_id, _UNITS.c.claim_token == claim.token,
                                          _UNITS.c.state == "claimed")
                     .values(state="pending", claim_token=None, lease_until=None))
        return self.store.transaction(f"releasing a claim of job {claim.job.name}",
                                      lambda conn: conn.execute(statement).rowcount == 1)

    # --- where jobs stand ------------------------------------------------------------------

    def status(self, name: str | None = None) -> list[JobStatus]:
        """Every job (or the one called `name`: JobError if missing), newest first, with each key's state."""
        if name is not None:
            self.get(name)

        def read(conn: Connection) -> list[JobStatus]:
            now = _now(conn)
            query = select(*_JOB_COLUMNS).order_by(_JOBS.c.id.desc())
            if name is not None:
                query = query.where(_JOBS.c.name == name)
            jobs = self.store.decode(_JOB_SPEC, conn.execute(query), Job)
            statuses = []
            for job in jobs:
                units = dict(self.store.decode(_UNIT_SPEC, conn.execute(
                    select(*_UNIT_COLUMNS).where(_UNITS.c.job_id == job.id)), lambda uid, *rest: (uid, _Unit(*rest))))
                rows = self.store.decode(_KEY_SPEC, conn.execute(
                    select(*_KEY_COLUMNS).select_from(_KEYS.outerjoin(_UNITS, _UNITS.c.id == _KEYS.c.unit_id))
                    .where(_KEYS.c.job_id == job.id).order_by(_KEYS.c.position)), lambda *values: values)
                keys = [self._job_key(job, units[row[2]], now, *row[1:]) for row in rows if row[2] in units]
                statuses.append(JobStatus(job, tuple(keys)))
            return statuses

        return self.store.transaction("reading jobs", read, write=False)

    @staticmethod
    def _job_key(job: Job, unit: _Unit, now: datetime, key: Key, unit_id: int, state: str, host: str | None,
                 pid: int | None, gpu: int | None, done_at: datetime | None, its_unit: int) -> JobKey:
        if state == "done":
            return JobKey(key, "done", Worker(host or "?", pid or 0, gpu), None, done_at, unit.claims)
        lease = unit.lease_until
        if unit.state == "claimed" and lease is not None and now <= lease <= now + timedelta(seconds=job.lease_s):
            return JobKey(key, "claimed", Worker(unit.host or "?", unit.pid or 0, unit.gpu, unit.gpu_name or ""),
                          (lease - now).total_seconds(), None, unit.claims)
        # never claimed, released, or its holder's lease ran out (or reads later than the job allows)
        return JobKey(key, "pending", None, None, None, unit.claims)


def finish_key_in(conn: Connection, claim: Claim, key: Key) -> bool:
    """JobQueue.finish_key's work inside the caller's transaction `conn`."""
    held = conn.execute(select(_UNITS.c.id).where(
        _UNITS.c.id == claim.unit_id, _UNITS.c.claim_token == claim.token, _UNITS.c.state == "claimed")
        .with_for_update()).first()
    if held is None:
        return False
    now = _now(conn)
    w = claim.worker
    raw = dict(zip(KEY_COLUMNS, key_values(key)))
    conn.execute(update(_KEYS).where(_KEYS.c.unit_id == claim.unit_id, _KEYS.c.state == "pending",
                                     *(_KEYS.c[c] == v for c, v in raw.items()))
                 .values(state="done", host=w.host, pid=w.pid, gpu=w.gpu, done_at=now))
    left = conn.execute(select(func.count()).select_from(_KEYS).where(
        _KEYS.c.unit_id == claim.unit_id, _KEYS.c.state != "done")).scalar_one()
    if left == 0:
        conn.execute(update(_UNITS).where(_UNITS.c.id == claim.unit_id).values(state="done", lease_until=None))
        # Two workers finishing the last two units at once would each count the other's unit as not
        # done (neither has committed) and leave the job open for ever. The job row's lock makes the
        # second wait for the first's commit; its count, a new statement, then sees that unit done.
        conn.execute(select(_JOBS.c.id).where(_JOBS.c.id == claim.job.id).with_for_update())
        units_left = conn.execute(select(func.count()).select_from(_UNITS).where(
            _UNITS.c.job_id == claim.job.id, _UNITS.c.state != "done")).scalar_one()
        if units_left == 0:
            conn.execute(update(_JOBS).where(_JOBS.c.id == claim.job.id).values(status="done", finished_at=now))
    return True
