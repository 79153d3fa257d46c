"""The store: tuning runs, trials and winners in SQLite (default) or PostgreSQL, through one API.

Every write is its own short transaction, so an interrupted tuning run loses at most the trial in
flight. On SQLite the database runs in WAL mode (readers never wait for the writer) with a busy
timeout, and write transactions begin IMMEDIATE so that two processes writing at once queue for
the lock instead of failing on a stale snapshot; a write that still finds the database locked (or,
on PostgreSQL, meets a deadlock or serialization failure) is retried with backoff until the
store's timeout has passed. An import plans its merge from a read before it takes the write lock,
then writes in batches, so it holds the lock for a fraction of a second per thousand winners.
Values handed out are frozen dataclasses; a stored row that fails their checks is skipped and
reported (`db.rows`), never handed out and never raised.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from operator import itemgetter
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from sqlalchemy import (BigInteger, Column, Connection, Engine, bindparam, case, delete, false, func, literal,
                        literal_column, or_, select, update)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .arch import normalize_arch
from .bulk import BulkStatement
from .engines import WRITE_OPTIONS, make_engine, use_wal
from .errors import (DatabaseCorruptError, DatabaseLockedError, DatabaseUnavailableError,
                     SchemaVersionError, StoreError, translated)
from .models import FEATURE_SINCE, KEY_COLUMNS, RecordedRow, RunRow, TrialRow, WinnerRow, utcnow
from .paths import default_url
from .text import mask_url
from .rows import (DamagedRow, DamagedRowWarning, Decoder, RowSpec, damage_summary, int32, key_values,
                   label, number, outcome, text, when)
from .schema import ensure, migrate
from .text import label_problem, shown
from .types import (FEATURE_DEFAULTS, INT32_MAX, OUTCOMES, Config, Key, check_head_dim, normalize_dtype,
                    normalize_op)

__all__ = ["DamagedRow", "DamagedRowWarning", "DatabaseCorruptError", "DatabaseLockedError",
           "DatabaseUnavailableError", "RunInfo", "SchemaVersionError", "StaleRun", "Store",
           "StoreError", "TrialRecord", "Winner", "load_winners", "migrate_database"]

# Writers wait this long for the SQLite lock (in SQLite's busy handler, then in retries with
# backoff); readers (the dispatcher at import) give up sooner.
WRITE_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 2.0
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.02, 1.0
# A run still 'running' with nothing recorded for this long was most likely killed.
STALE_RUN_AFTER = timedelta(hours=1)
_MAX_ARGS_CHARS = 1 << 20
# A recorded key's call count stops here (the BIGINT column's largest value) instead of
# overflowing: SQLite would turn the sum into a REAL (a damaged row), PostgreSQL would refuse it.
MAX_RECORDED_CALLS = 2**63 - 1
# Recorded counts are written this many keys per transaction: about 30 ms of SQLite's write lock
# on a 2-core machine, so a tuner's trial commit waits that long at most behind a flush.
RECORDED_BATCH = 2000
# Rows per fetch of a streamed read.
_STREAM_ROWS = 5000

# Core tables, not the ORM classes: a read then skips the mapper set-up (about 15 ms at the
# first query of a process, paid at every app import).
_RUNS, _TRIALS, _WINNERS = RunRow.__table__, TrialRow.__table__, WinnerRow.__table__
_RECORDED = RecordedRow.__table__
T = TypeVar("T")


def _label(table: Any, column: str, *, required: bool = False, nullable: bool = False) -> Callable[[Any], Any]:
    """The label check of a String column, at the column's own length."""
    return label(table.c[column].type.length, required=required, nullable=nullable)


@dataclass(frozen=True)
class RunInfo:
    """Provenance of one tuning run: the GPU, the software stack, the host and the arguments.

    Checked when built: every text field follows the label rule of `db.text` within its column's
    length (ValueError naming the field; TypeError for a non-str), counts and sizes are ints
    within int32, and `args` is JSON (finite numbers, at most 1 MiB).
    """

    gpu_name: str
    arch: str
    sm_count: int
    smem_limit: int
    driver: str
    cuda: str
    triton_version: str
    torch_version: str
    kernel_version: str
    host: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gpu_name", "arch", "driver", "cuda", "triton_version", "torch_version",
                     "kernel_version", "host"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"RunInfo.{name} must be a str, got {shown(value)}")
            problem = label_problem(value, _RUNS.c[name].type.length,
                                    required=name in ("gpu_name", "arch", "kernel_version"))
            if problem is not None:
                raise ValueError(f"RunInfo.{name} {problem}")
        for name in ("sm_count", "smem_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT32_MAX:
                raise ValueError(f"RunInfo.{name} must be an int from 0 to {INT32_MAX}, got {shown(value)}")
        try:
            size = len(json.dumps(self.args, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"RunInfo.args must be JSON-able: {exc}") from None
        if size > _MAX_ARGS_CHARS:
            raise ValueError(f"RunInfo.args is {size} characters of JSON, more than {_MAX_ARGS_CHARS}")


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """One config tried for one key, as stored."""

    id: int
    run_id: int | None
    key: Key
    config: Config
    outcome: str
    median_ms: float | None
    tflops: float | None
    compile_s: float | None
    error: str | None
    kernel_version: str
    gpu_name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Winner:
    """The best measured config of a key, with where and when it was measured."""

    key: Key
    config: Config
    median_ms: float
    tflops: float | None
    kernel_version: str
    gpu_name: str
    sm_count: int | None
    driver: str | None
    cuda: str | None
    triton_version: str | None
    torch_version: str | None
    host: str | None
    measured_at: datetime
    trial_id: int | None
    kernel_config: Config | None = None  # the key's best kernel config, set when an SDPA backend won


@dataclass(frozen=True)
class RecordedKey:
    """A key apps ran under FLASHTUNE_RECORD=1: how often, first and last seen."""

    key: Key
    calls: int
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class StaleRun:
    """A run still marked 'running' with nothing recorded since `last_activity`: probably killed."""

    run_id: int
    gpu_name: str
    host: str
    started_at: datetime
    last_activity: datetime


# --- conversions between values and rows -------------------------------------------------------

def _key_values(key: Key) -> dict[str, Any]:
    return dict(zip(KEY_COLUMNS, key_values(key)))


def _config_values(config: Config) -> dict[str, Any]:
    extra = json.dumps(config.extra_dict, sort_keys=True, separators=(",", ":"))
    return {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "config_extra": extra}


# What a winner or trial row decodes to, column by column (db.rows): the order of the selects.
WINNER_SPEC = RowSpec(_WINNERS.name, key=True, config=True, columns=(
    ("median_ms", number(positive=True)), ("tflops", number(positive=False, nullable=True)),
    ("kernel_version", _label(_WINNERS, "kernel_version", required=True)),
    ("gpu_name", _label(_WINNERS, "gpu_name", required=True)), ("sm_count", int32(nullable=True)),
    *((name, _label(_WINNERS, name, nullable=True))
      for name in ("driver", "cuda", "triton_version", "torch_version", "host")),
    ("measured_at", when()), ("trial_id", int32(nullable=True)),
    ("kernel_config", lambda text: None if text is None else Config.parse(text))))


def _ok_has_time(values: Mapping[str, Any]) -> tuple[str, str] | None:
    if values["outcome"] == "ok" and values["median_ms"] is None:
        return "median_ms", "an 'ok' trial without its median_ms"
    return None


TRIAL_SPEC = RowSpec(_TRIALS.name, key=True, config=True, columns=(
    ("run_id", int32(nullable=True)), ("outcome", outcome), ("median_ms", number(positive=True, nullable=True)),
    ("tflops", number(positive=False, nullable=True)), ("compile_s", number(positive=False, nullable=True)),
    ("error", text(nullable=True)), ("kernel_version", _label(_TRIALS, "kernel_version", required=True)),
    ("gpu_name", _label(_TRIALS, "gpu_name", required=True)), ("created_at", when())),
    rule=_ok_has_time)

_RECORDED_SPEC = RowSpec(_RECORDED.name, key=True, config=False, columns=(
    ("calls", lambda n: n if type(n) is int and n > 0 else int32()(None)), ("first_seen", when()),
    ("last_seen", when())))

_RUN_ACTIVITY_SPEC = RowSpec(_RUNS.name, key=False, config=False, columns=(
    ("gpu_name", _label(_RUNS, "gpu_name", required=True)), ("host", _label(_RUNS, "host")),
    ("started_at", when()), ("created_at of its last trial", when(nullable=True))))


def _columns(table: Any, spec: RowSpec) -> list[Any]:
    return [table.c[name] for name in spec.names]


_WINNER_COLUMNS = _columns(_WINNERS, WINNER_SPEC)
_TRIAL_COLUMNS = _columns(_TRIALS, TRIAL_SPEC)
_RECORDED_COLUMNS = _columns(_RECORDED, _RECORDED_SPEC)
_N_KEY = len(KEY_COLUMNS)


def _missing(version: int) -> set[str]:
    """The key columns a database at schema `version` does not have yet (features that joined later)."""
    return {name for name, since in FEATURE_SINCE.items() if version < since}


def readable(columns: Sequence[Any], version: int) -> list[Any]:
    """`columns` as a database at schema `version` can select them: a key column it does not have
    yet (an attention feature, schema 4; a token bucket or page size, schema 5) reads as its default,
    which is what every row of it meant. A read-only open of an older database (schema.READABLE_SINCE)
    reads through this."""
    missing = _missing(version)
    return [literal(FEATURE_DEFAULTS[c.name], c.type).label(c.name)
            if isinstance(c, Column) and c.name in missing else c for c in columns]


def key_filter(table: Any, key: Key, version: int) -> list[Any]:
    """The WHERE terms that match `key`'s row of `table` in a database at schema `version`."""
    missing = _missing(version)
    values = _key_values(key)
    if any(values[c] != FEATURE_DEFAULTS[c] for c in missing):
        return [false()]  # the database predates that feature: no row of it has it on
    return [table.c[c] == v for c, v in values.items() if c not in missing]

# Built once: building `.values(...)` per call would cost more than the SQLite commit.
_INSERT_TRIAL = _TRIALS.insert().returning(_TRIALS.c.id)
# An import's two statements, each run once with many parameter sets (db.bulk).
_WINNER_VALUE_COLUMNS = [c.name for c in _WINNERS.columns if c.name != "id" and c.name not in KEY_COLUMNS]
_INSERT_WINNER = _WINNERS.insert().values(
    {name: bindparam(name) for name in (*KEY_COLUMNS, *_WINNER_VALUE_COLUMNS)})
_UPDATE_WINNER = (_WINNERS.update().where(_WINNERS.c.id == bindparam("row_id"))
                  .values({name: bindparam(name) for name in _WINNER_VALUE_COLUMNS}))


def winner_values(winner: Winner) -> dict[str, Any]:
    """The winners-table columns of a Winner (the exchange import writes these)."""
    return {**_key_values(winner.key), **_config_values(winner.config),
            "median_ms": winner.median_ms, "tflops": winner.tflops,
            "kernel_version": winner.kernel_version, "gpu_name": winner.gpu_name,
            "sm_count": winner.sm_count, "driver": winner.driver, "cuda": winner.cuda,
            "triton_version": winner.triton_version, "torch_version": winner.torch_version,
            "host": winner.host, "measured_at": winner.measured_at, "trial_id": winner.trial_id,
            "kernel_config": None if winner.kernel_config is None else str(winner.kernel_config)}


def _finite(name: str, value: float | None, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number or None, got {shown(value)}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return float(value)


def _upsert(dialect: str) -> Callable[..., Any]:
    return pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert


def _upsert_recorded(dialect: str) -> Any:
    """One recorded key's upsert: the calls add to the stored ones, saturating at MAX_RECORDED_CALLS
    (compared before adding, so the sum itself never overflows)."""
    insert = _upsert(dialect)(_RECORDED).inline().values(
        {name: bindparam(name) for name in (*KEY_COLUMNS, "calls", "first_seen", "last_seen")})
    stored, new = _RECORDED.c.calls, insert.excluded.calls
    most = literal_column(str(MAX_RECORDED_CALLS), BigInteger)  # in the SQL text: every parameter is a row's
    return insert.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_={
        "calls": case((stored > most - new, most), else_=stored + new),
        "last_seen": insert.excluded.last_seen})


class _KeyRows:
    """The stored winner rows of a set of keys, matched on their raw key columns (stored keys are
    canonical): read whole to plan a merge, then compared with that read inside the write lock."""

    def __init__(self, keys: Iterable[Key], version: int) -> None:
        self.wanted = {key_values(key) for key in keys}
        archs = sorted({raw[0] for raw in self.wanted})
        self._query = select(*readable(_WINNER_COLUMNS, version)).where(_WINNERS.c.arch.in_(archs))

    def read(self, conn: Connection) -> dict[tuple[Any, ...], Any]:
        """The rows of the wanted keys, by raw key."""
        return {raw: row for row in conn.execute(self._query).all()
                if (raw := tuple(row[1:1 + _N_KEY])) in self.wanted}

    def unchanged(self, conn: Connection, before: Mapping[tuple[Any, ...], Any]) -> bool:
        """Whether the rows are exactly those of `before`; streamed, so that the rows are not held
        in memory twice."""
        count = 0
        for part in conn.execute(self._query).partitions(2000):
            for row in part:
                raw = tuple(row[1:1 + _N_KEY])
                if raw in self.wanted:
                    if before.get(raw) != row:
                        return False
                    count += 1
        return count == len(before)


# --- the store ---------------------------------------------------------------------------------

class Store:
    """A flashtune database. Open with `Store.open(url)`; close it, or use it as a context manager."""

    def __init__(self, engine: Engine, url: str, schema_version: int, timeout_s: float) -> None:
        self._engine = engine
        self._url = url
        self._where = mask_url(url)
        self._schema_version = schema_version
        self._timeout_s = timeout_s
        self._runs: dict[int, tuple[str, str, str]] = {}  # run id -> (arch, kernel_version, gpu_name)
        self._damaged: dict[tuple[str, Any, str], DamagedRow] = {}

    @classmethod
    def open(cls, url: str | None = None, *, create: bool = True,
             timeout_s: float | None = None) -> "Store":
        """Open the database at `url` (default: `db.paths.default_url()`).

        With `create`, a missing SQLite file and a database without flashtune tables get the
        current schema. Without it nothing is ever created or written: a missing file or empty
        database is DatabaseUnavailableError. An older or newer schema is SchemaVersionError; a URL
        that names no usable persistent database (in-memory SQLite included) is DatabaseURLError.
        `timeout_s` bounds how long a write waits for another writer's lock (default 30 s with
        `create`, else 2 s).
        """
        url = default_url() if url is None else str(url)
        timeout = timeout_s if timeout_s is not None else (WRITE_TIMEOUT_S if create else READ_TIMEOUT_S)
        engine = make_engine(url, create, timeout)
        try:
            with translated(url, "opening"):
                version = ensure(engine, mask_url(url), create=create, write_options=WRITE_OPTIONS)
                if create:
                    use_wal(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url, version, timeout)

    @property
    def url(self) -> str:
        """The URL this store was opened with."""
        return self._url

    @property
    def display_url(self) -> str:
        """The URL with any password masked."""
        return self._where

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return self._schema_version

    @property
    def damaged_rows(self) -> list[DamagedRow]:
        """Every damaged row the reads of this store skipped so far, each once (see `db.rows`)."""
        return list(self._damaged.values())

    def close(self) -> None:
        """Release the connections."""
        self._engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._where!r})"

    def _read(self) -> Connection:
        return self._engine.connect()

    def _write(self) -> Connection:
        return self._engine.connect().execution_options(**WRITE_OPTIONS)

    def _writing(self, doing: str, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in one write transaction. A locked database (another writer; on PostgreSQL
        a deadlock or serialization failure) rolls the attempt back; it is retried with growing,
        jittered pauses until the store's timeout has passed, then the one-line error is raised."""
        started = time.monotonic()
        pause = _FIRST_PAUSE_S
        while True:
            try:
                with translated(self._url, doing), self._write() as conn, conn.begin():
                    return work(conn)
            except DatabaseLockedError as exc:
                waited = time.monotonic() - started
                if waited + pause > self._timeout_s:
                    raise DatabaseLockedError(f"{exc}; gave up after {waited:.1f} s") from exc
            time.sleep(pause * random.uniform(0.5, 1.0))  # jitter: writers that collided spread out
            pause = min(2 * pause, _MAX_PAUSE_S)

    def transaction(self, doing: str, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """`work(conn)` in one transaction of this store, for the db package's other tables (the
        fleet queue, `db.jobs`): a write retries a locked database like every write here; errors are
        StoreErrors naming `doing`."""
        if write:
            return self._writing(doing, work)
        with translated(self._url, doing), self._read() as conn, conn.begin():
            return work(conn)

    def decode(self, spec: RowSpec, rows: Iterable[Any], build: Callable[..., T]) -> list[T]:
        """Rows to values; damaged rows are skipped, kept in `damaged_rows`, and the new ones of
        this read reported in one DamagedRowWarning."""
        decoder = Decoder(spec)
        values = decoder.decode(rows, build)
        new = [d for d in decoder.damaged if (d.table, d.row_id, d.column) not in self._damaged]
        for d in new:
            self._damaged[(d.table, d.row_id, d.column)] = d
        if new:
            warnings.warn(damage_summary(new, self._where), DamagedRowWarning, stacklevel=4)
        return values

    @cached_property
    def _bulk(self) -> dict[str, BulkStatement]:
        # Compiled at the first import, not at every open: the dispatcher opens a store per app import.
        return {name: BulkStatement(statement, self._engine.dialect)
                for name, statement in (("insert", _INSERT_WINNER), ("update", _UPDATE_WINNER))}

    def _winners(self, rows: Iterable[Any]) -> list[Winner]:
        return self.decode(WINNER_SPEC, rows, lambda _id, key, config, *rest: Winner(key, config, *rest))

    # --- runs and trials -------------------------------------------------------------------

    def start_run(self, info: RunInfo) -> int:
        """Record the start of a tuning run; its id."""
        if not isinstance(info, RunInfo):
            raise TypeError(f"start_run needs a RunInfo, got {type(info).__name__}")
        values = {name: getattr(info, name) for name in (
            "gpu_name", "arch", "sm_count", "smem_limit", "driver", "cuda", "triton_version",
            "torch_version", "kernel_version", "host")}
        statement = _RUNS.insert().values(**values, args=dict(info.args), status="running",
                                          started_at=utcnow()).returning(_RUNS.c.id)
        run_id = self._writing("starting a run", lambda conn: conn.execute(statement).scalar_one())
        self._runs[run_id] = (info.arch.strip(), info.kernel_version, info.gpu_name)
        return run_id

    def finish_run(self, run_id: int, status: str = "done") -> None:
        """Mark a run finished ('done', 'interrupted', 'failed', ...) now."""
        problem = label_problem(status, _RUNS.c.status.type.length, required=True)
        if problem is not None:
            raise ValueError(f"run status {problem}")
        _check_id(run_id)
        statement = (update(_RUNS).where(_RUNS.c.id == run_id)
                     .values(status=status, finished_at=utcnow()))
        count = self._writing("finishing a run", lambda conn: conn.execute(statement).rowcount)
        if not count:
            raise ValueError(f"no run with id {run_id!r} in {self._where}")

    def _run(self, run_id: int) -> tuple[str, str, str]:
        if run_id not in self._runs:
            _check_id(run_id)
            with translated(self._url, "reading a run"), self._read() as conn:
                row = conn.execute(select(_RUNS.c.arch, _RUNS.c.kernel_version, _RUNS.c.gpu_name)
                                   .where(_RUNS.c.id == run_id)).first()
            if row is None:
                raise ValueError(f"no run with id {run_id!r} in {self._where}")
            self._runs[run_id] = (row.arch, row.kernel_version, row.gpu_name)
        return self._runs[run_id]

    def record_trial(self, run_id: int, key: Key, config: Config, outcome: str, *,
                     median_ms: float | None = None, tflops: float | None = None,
                     compile_s: float | None = None, error: str | None = None,
                     kernel_version: str | None = None) -> TrialRecord:
        """Store one trial in its own transaction. The GPU name comes from the run; the kernel version
        is `kernel_version` (the version of the key's op) or, without one, the run's."""
        if not isinstance(key, Key) or not isinstance(config, Config):
            raise TypeError(f"record_trial needs a Key and a Config, got {type(key).__name__} "
                            f"and {type(config).__name__}")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown trial outcome {shown(outcome)}: expected one of {', '.join(OUTCOMES)}")
        median_ms = _finite("median_ms", median_ms, positive=True)
        tflops = _finite("tflops", tflops)
        compile_s = _finite("compile_s", compile_s)
        if outcome == "ok" and median_ms is None:
            raise ValueError("an 'ok' trial needs its median_ms")
        if error is not None and not isinstance(error, str):
            raise TypeError(f"error must be a str or None, got {type(error).__name__}")
        arch, run_version, gpu_name = self._run(run_id)
        if kernel_version is None:
            kernel_version = run_version
        else:
            problem = label_problem(kernel_version, _TRIALS.c.kernel_version.type.length, required=True)
            if problem is not None:
                raise ValueError(f"trial kernel_version {problem}")
        if arch != key.arch:
            raise ValueError(f"trial key {key} is for {key.arch} but run {run_id} ran on {arch}")
        created = utcnow()
        params = {"run_id": run_id, **_key_values(key), **_config_values(config), "outcome": outcome,
                  "median_ms": median_ms, "tflops": tflops, "compile_s": compile_s, "error": error,
                  "kernel_version": kernel_version, "gpu_name": gpu_name, "created_at": created}
        trial_id = self._writing("recording a trial",
                                 lambda conn: conn.execute(_INSERT_TRIAL, params).scalar_one())
        return TrialRecord(trial_id, run_id, key, config, outcome, median_ms, tflops, compile_s,
                           error, kernel_version, gpu_name, created)

    def trials(self, key: Key | None = None, *, arch: str | None = None,
               kernel_version: str | None = None, gpu_name: str | None = None,
               outcome: str | None = None) -> list[TrialRecord]:
        """Trials matching every filter given, oldest first; damaged rows are skipped (see
        `damaged_rows`)."""
        query = select(*readable(_TRIAL_COLUMNS, self._schema_version))
        if key is not None:
            query = query.where(*key_filter(_TRIALS, key, self._schema_version))
        if arch is not None:
            query = query.where(_TRIALS.c.arch == normalize_arch(arch))
        if kernel_version is not None:
            query = query.where(_TRIALS.c.kernel_version == kernel_version)
        if gpu_name is not None:
            query = query.where(_TRIALS.c.gpu_name == gpu_name)
        if outcome is not None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown trial outcome {shown(outcome)}: expected one of {', '.join(OUTCOMES)}")
            query = query.where(_TRIALS.c.outcome == outcome)
        with translated(self._url, "reading trials"), self._read() as conn:
            rows = conn.execute(query.order_by(_TRIALS.c.id)).all()
        return self.decode(TRIAL_SPEC, rows, lambda row_id, key, config, run_id, *rest:
                            TrialRecord(row_id, run_id, key, config, *rest))

    def stale_runs(self, older_than: timedelta = STALE_RUN_AFTER, *,
                   now: datetime | None = None) -> list[StaleRun]:
        """Runs still marked 'running' whose last trial (or start, if none) is older than
        `older_than`: most likely killed, since a live run records a trial every few seconds."""
        now = now or utcnow()
        last_trial = func.max(_TRIALS.c.created_at)
        query = (select(_RUNS.c.id, _RUNS.c.gpu_name, _RUNS.c.host, _RUNS.c.started_at, last_trial)
                 .select_from(_RUNS.outerjoin(_TRIALS, _TRIALS.c.run_id == _RUNS.c.id))
                 .where(_RUNS.c.status == "running").group_by(_RUNS.c.id).order_by(_RUNS.c.id))
        with translated(self._url, "reading runs"), self._read() as conn:
            rows = conn.execute(query).all()
        runs = self.decode(_RUN_ACTIVITY_SPEC, rows, lambda run_id, gpu, host, started, last:
                            StaleRun(run_id, gpu, host, started, max(started, last or started)))
        return [run for run in runs if now - run.last_activity > older_than]

    # --- winners ---------------------------------------------------------------------------

    def offer_winner(self, trial: TrialRecord, *, replace: bool = False, kernel_config: Config | None = None) -> bool:
        """Make an `ok` trial its key's winner if there is none, it is faster, the current one is
        from another kernel version, or `replace`; whether the winner changed. Non-ok: False.
        `kernel_config` is the key's best kernel config, stored when the trial is an SDPA backend's
        (None when the kernel itself won)."""
        if not isinstance(trial, TrialRecord):
            raise TypeError(f"offer_winner needs a TrialRecord, got {type(trial).__name__}")
        if kernel_config is not None and not isinstance(kernel_config, Config):
            raise TypeError(f"kernel_config must be a Config or None, got {type(kernel_config).__name__}")
        if trial.outcome != "ok" or trial.median_ms is None:
            return False

        def offer(conn: Connection) -> bool:
            provenance: dict[str, Any] = dict.fromkeys(
                ("sm_count", "driver", "cuda", "triton_version", "torch_version", "host"))
            if trial.run_id is not None:
                row = conn.execute(select(_RUNS).where(_RUNS.c.id == trial.run_id)).first()
                if row is not None:
                    provenance = {name: getattr(row, name) for name in provenance}
            values = {**_key_values(trial.key), **_config_values(trial.config),
                      "median_ms": trial.median_ms, "tflops": trial.tflops,
                      "kernel_version": trial.kernel_version, "gpu_name": trial.gpu_name,
                      **provenance, "measured_at": trial.created_at, "trial_id": trial.id,
                      "kernel_config": None if kernel_config is None else str(kernel_config)}
            insert = _upsert(conn.dialect.name)(_WINNERS).values(**values)
            better = None if replace else or_(
                _WINNERS.c.median_ms > insert.excluded.median_ms,
                _WINNERS.c.kernel_version != insert.excluded.kernel_version)
            statement = insert.on_conflict_do_update(
                index_elements=list(KEY_COLUMNS),
                set_={name: insert.excluded[name] for name in values if name not in KEY_COLUMNS},
                where=better).returning(_WINNERS.c.id)
            return conn.execute(statement).first() is not None

        return self._writing("setting a winner", offer)

    def winners(self, arch: str | None = None, *, op: str | None = None, dtype: str | None = None,
                head_dim: int | None = None, causal: bool | None = None) -> list[Winner]:
        """Winners matching every filter given, ordered by key; damaged rows are skipped (see
        `damaged_rows`)."""
        query = select(*readable(_WINNER_COLUMNS, self._schema_version))
        if arch is not None:
            query = query.where(_WINNERS.c.arch == normalize_arch(arch))
        if op is not None:
            query = query.where(_WINNERS.c.op == normalize_op(op))
        if dtype is not None:
            query = query.where(_WINNERS.c.dtype == normalize_dtype(dtype))
        if head_dim is not None:
            query = query.where(_WINNERS.c.head_dim == check_head_dim(head_dim))
        if causal is not None:
            if causal not in (True, False):
                raise ValueError(f"causal must be a bool, got {shown(causal)}")
            query = query.where(_WINNERS.c.causal == bool(causal))
        return self._select_winners(query)

    def winners_for_archs(self, archs: Iterable[str]) -> list[Winner]:
        """Winners of several archs in one query (the dispatcher's read). Unknown archs match nothing."""
        names = []
        for arch in archs:
            try:
                names.append(normalize_arch(arch))
            except ValueError:
                names.append(str(arch))  # a real but unknown chip: nothing is tuned for it
        return self._select_winners(select(*readable(_WINNER_COLUMNS, self._schema_version)).where(_WINNERS.c.arch.in_(sorted(set(names)))))

    def _select_winners(self, query: Any) -> list[Winner]:
        missing = _missing(self._schema_version)
        order = [_WINNERS.c[c] for c in KEY_COLUMNS if c not in missing]
        with translated(self._url, "reading winners"), self._read() as conn:
            rows = conn.execute(query.order_by(*order)).all()
        return self._winners(rows)

    def merge_winners(self, keys: Iterable[Key],
                      plan: Callable[[Mapping[Key, Winner]], Sequence[Winner]], *,
                      dry_run: bool = False) -> None:
        """Write the winners `plan` chooses, given the stored winners of `keys`, in one transaction
        (each replacing its key's row). `dry_run` only reads: it takes no write lock.

        `plan` runs first on a read, outside the write transaction, and the rows to write are
        prepared there too. The transaction then reads the rows of `keys` once more: if any
        changed meanwhile (a tuner offered a winner), `plan` runs again on what is stored now, so
        the merge is exactly as if it ran alone. The writes are one INSERT and one UPDATE
        statement, each executed with many parameter sets, so the write lock is held for the
        re-read and the batch only.
        """
        rows = _KeyRows(keys, self._schema_version)
        if not rows.wanted:
            plan({})
            return

        def existing(stored: Mapping[tuple[Any, ...], Any]) -> dict[Key, Winner]:
            return {w.key: w for w in self._winners(stored.values())}

        def prepare(chosen: Sequence[Winner], stored: Mapping[tuple[Any, ...], Any]) -> tuple[list[Any], list[Any]]:
            inserts, updates = [], []
            # Key order: two imports at once on PostgreSQL lock rows in the same order, never a cycle.
            for raw, winner in sorted(((key_values(w.key), w) for w in chosen), key=itemgetter(0)):
                values = winner_values(winner)
                row = stored.get(raw)  # a damaged row of the key is replaced, too
                if row is None:
                    inserts.append(values)
                else:
                    values["row_id"] = row.id
                    updates.append(values)
            return self._bulk["insert"].parameters(inserts), self._bulk["update"].parameters(updates)

        with translated(self._url, "reading winners"), self._read() as conn:
            before = rows.read(conn)
        chosen = plan(existing(before))
        if dry_run or not chosen:
            return
        prepared = prepare(chosen, before)

        def write(conn: Connection) -> None:
            if rows.unchanged(conn, before):
                inserts, updates = prepared
            else:
                now = rows.read(conn)
                inserts, updates = prepare(plan(existing(now)), now)
            self._bulk["insert"].execute(conn, inserts)
            self._bulk["update"].execute(conn, updates)

        self._writing("merging winners", write)

    # --- recorded shapes ---------------------------------------------------------------------

    def add_recorded(self, counts: Mapping[Key, int],
                     written: Callable[[Sequence[Key]], None] | None = None) -> None:
        """Add calls to the recorded keys (FLASHTUNE_RECORD=1); a sum past MAX_RECORDED_CALLS stays
        at it. Written RECORDED_BATCH keys per transaction, so no flush holds the write lock for
        long; `written` is called with each batch's keys once it is committed (a failure raises
        with the earlier batches kept)."""
        items = []
        for key, calls in counts.items():
            if not isinstance(key, Key):
                raise TypeError(f"recorded keys must be Keys, got {type(key).__name__}")
            if isinstance(calls, bool) or not isinstance(calls, int) or calls <= 0:
                raise ValueError(f"calls of {key} must be a positive int, got {shown(calls)}")
            items.append((key_values(key), key, min(calls, MAX_RECORDED_CALLS)))
        items.sort(key=itemgetter(0))  # one lock order for every writer
        now = utcnow()
        statement = BulkStatement(_upsert_recorded(self.backend), self._engine.dialect)
        for start in range(0, len(items), RECORDED_BATCH):
            batch = items[start:start + RECORDED_BATCH]
            parameters = statement.parameters(
                {**dict(zip(KEY_COLUMNS, raw)), "calls": calls, "first_seen": now, "last_seen": now}
                for raw, _, calls in batch)
            self._writing("recording shapes", lambda conn: statement.execute(conn, parameters))
            if written is not None:
                written([key for _, key, _ in batch])

    def recorded(self, arch: str | None = None) -> list[RecordedKey]:
        """The recorded keys (of `arch`, when given), the most-called first; damaged rows skipped."""
        return list(self.iter_recorded(arch))

    def iter_recorded(self, arch: str | None = None) -> Iterator[RecordedKey]:
        """`recorded(arch)` streamed: rows are fetched and decoded a partition at a time, so a listing
        of any length holds one partition in memory. The read stays open until the iterator ends."""
        query = select(*readable(_RECORDED_COLUMNS, self._schema_version))
        if arch is not None:
            query = query.where(_RECORDED.c.arch == normalize_arch(arch))
        with translated(self._url, "reading recorded shapes"), self._read() as conn:
            result = conn.execution_options(stream_results=True, yield_per=_STREAM_ROWS).execute(
                query.order_by(_RECORDED.c.calls.desc(), _RECORDED.c.id))
            for part in result.partitions():
                yield from self.decode(_RECORDED_SPEC, part,
                                       lambda _id, key, calls, first, last: RecordedKey(key, calls, first, last))

    # --- maintenance -----------------------------------------------------------------------

    def prune(self, keep_kernel_version: str) -> tuple[int, int]:
        """Delete the trials, winners and runs of every other kernel version; (trials, winners) deleted."""
        if not isinstance(keep_kernel_version, str) or not keep_kernel_version.strip():
            raise ValueError(f"prune needs the kernel version to keep, got {shown(keep_kernel_version)}")

        def prune(conn: Connection) -> tuple[int, int]:
            winners = conn.execute(delete(_WINNERS).where(
                _WINNERS.c.kernel_version != keep_kernel_version)).rowcount
            trials = conn.execute(delete(_TRIALS).where(
                _TRIALS.c.kernel_version != keep_kernel_version)).rowcount
            conn.execute(delete(_RUNS).where(_RUNS.c.kernel_version != keep_kernel_version))
            return trials, winners

        counts = self._writing("pruning", prune)
        self._runs = {k: v for k, v in self._runs.items() if v[1] == keep_kernel_version}
        return counts

    def counts(self) -> dict[str, int]:
        """Row counts of runs, trials and winners."""
        with translated(self._url, "counting rows"), self._read() as conn:
            return {name: conn.execute(select(func.count()).select_from(model)).scalar_one()
                    for name, model in (("runs", _RUNS), ("trials", _TRIALS), ("winners", _WINNERS))}

    def vacuum(self) -> None:
        """Reclaim space and refresh planner statistics (SQLite: also fold the WAL into the file)."""
        with translated(self._url, "vacuuming"):
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                if self.backend == "sqlite":
                    conn.exec_driver_sql("VACUUM")
                    conn.exec_driver_sql("ANALYZE")
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                else:
                    for table in (_RUNS, _TRIALS, _WINNERS):
                        conn.exec_driver_sql(f"VACUUM ANALYZE {table.name}")


def _check_id(run_id: Any) -> None:
    # A row id the database can hold: anything else is no run, not an OverflowError.
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 <= run_id <= INT32_MAX:
        raise ValueError(f"no run with id {shown(run_id)}: run ids are ints from 0 to {INT32_MAX}")


def migrate_database(url: str | None = None, *, repair: bool = False,
                     report: Callable[[str], None] = lambda _: None) -> tuple[int | None, int]:
    """Create or migrate the schema at `url` to the current version; (old version or None, new). Rows
    whose foreign key names a missing row refuse the migration, unless `repair` (see `schema.migrate`)."""
    url = default_url() if url is None else str(url)
    engine = make_engine(url, True, WRITE_TIMEOUT_S)
    try:
        with translated(url, "migrating"):
            versions = migrate(engine, mask_url(url), write_options=WRITE_OPTIONS, repair=repair, report=report)
            use_wal(engine)
            return versions
    finally:
        engine.dispose()


def load_winners(archs: Iterable[str], url: str | None = None) -> list[Winner]:
    """The dispatcher's import-time read: the winners of `archs` in one query, creating nothing.

    Raises DatabaseUnavailableError (missing, locked, unreachable, not a regular file),
    DatabaseCorruptError, SchemaVersionError or DatabaseURLError; the caller falls back to
    defaults with a warning. Damaged rows are skipped with one DamagedRowWarning, never raised.
    """
    archs = list(archs)
    with Store.open(url, create=False) as store:
        return store.winners_for_archs(archs)
