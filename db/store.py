"""The store: tuning runs, trials and winners in SQLite (default) or PostgreSQL, through one API.

Every write is its own short transaction, so an interrupted tuning run loses at most the trial in
flight. On SQLite the database runs in WAL mode (readers never wait for the writer) with a busy
timeout, and write transactions begin IMMEDIATE so that two processes writing at once queue for
the lock instead of failing on a stale snapshot. Values handed out are frozen dataclasses.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import Connection, Engine, create_engine, delete, event, func, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from .arch import normalize_arch
from .errors import (DatabaseCorruptError, DatabaseUnavailableError, SchemaVersionError,
                     StoreError, translated)
from .models import CONFIG_COLUMNS, KEY_COLUMNS, RunRow, TrialRow, WinnerRow, utcnow
from .paths import default_url, mask_url, parse_url, sqlite_path
from .schema import ensure, migrate
from .types import OUTCOMES, Config, Key, normalize_dtype, normalize_op

__all__ = ["DatabaseCorruptError", "DatabaseUnavailableError", "RunInfo", "SchemaVersionError",
           "Store", "StoreError", "TrialRecord", "Winner", "load_winners", "migrate_database"]

# Writers wait this long for the SQLite lock; readers (the dispatcher at import) give up sooner.
WRITE_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 2.0
PG_CONNECT_TIMEOUT_S = 5
_WRITE = {"flashtune_write": True}
_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class RunInfo:
    """Provenance of one tuning run: the GPU, the software stack, the host and the arguments."""

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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


# --- conversions between values and rows -------------------------------------------------------

def _key_values(key: Key) -> dict[str, Any]:
    return {"arch": key.arch, "op": key.op, "seq_len": key.seq_len, "seq_len_kv": key.seq_len_kv,
            "head_dim": key.head_dim, "dtype": key.dtype, "causal": key.causal}


def _config_values(config: Config) -> dict[str, Any]:
    extra = json.dumps(config.extra_dict, sort_keys=True, separators=(",", ":"))
    return {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "config_extra": extra}


# Core tables, not the ORM classes: a read then skips the mapper set-up (about 15 ms at the
# first query of a process, paid at every app import).
_RUNS, _TRIALS, _WINNERS = RunRow.__table__, TrialRow.__table__, WinnerRow.__table__

# Built once: building `.values(...)` per call would cost more than the SQLite commit.
_INSERT_TRIAL = _TRIALS.insert().returning(_TRIALS.c.id)

_WINNER_COLUMNS = [_WINNERS.c.id, *(getattr(_WINNERS.c, c) for c in KEY_COLUMNS + CONFIG_COLUMNS),
                   _WINNERS.c.median_ms, _WINNERS.c.tflops, _WINNERS.c.kernel_version,
                   _WINNERS.c.gpu_name, _WINNERS.c.sm_count, _WINNERS.c.driver, _WINNERS.c.cuda,
                   _WINNERS.c.triton_version, _WINNERS.c.torch_version, _WINNERS.c.host,
                   _WINNERS.c.measured_at, _WINNERS.c.trial_id]
_TRIAL_COLUMNS = [_TRIALS.c.id, *(getattr(_TRIALS.c, c) for c in KEY_COLUMNS + CONFIG_COLUMNS),
                  _TRIALS.c.run_id, _TRIALS.c.outcome, _TRIALS.c.median_ms, _TRIALS.c.tflops,
                  _TRIALS.c.compile_s, _TRIALS.c.error, _TRIALS.c.kernel_version, _TRIALS.c.gpu_name,
                  _TRIALS.c.created_at]


class _Decoder:
    """Rows (in the column order above) to values, validated as they are built.

    Many rows share a config, so each distinct one is parsed and validated once: the dispatcher
    decodes every winner of an arch at app import.
    """

    def __init__(self, table: str, where: str) -> None:
        self._table = table
        self._where = where
        self._configs: dict[tuple[Any, ...], Config] = {}

    def _config(self, raw: tuple[Any, ...]) -> Config:
        config = self._configs.get(raw)
        if config is None:
            block_m, block_n, num_warps, num_stages, extra = raw
            items = () if extra in ("", "{}") else tuple(json.loads(extra).items())
            config = self._configs[raw] = Config(block_m, block_n, num_warps, num_stages, items)
        return config

    def _split(self, row: Any) -> tuple[int, Key, Config, tuple[Any, ...]]:
        row_id, arch, op, n, n_kv, d, dtype, causal = row[:8]
        key = Key(arch, op, n, d, dtype, bool(causal), n_kv)
        return row_id, key, self._config(tuple(row[8:13])), tuple(row[13:])

    def _bad(self, row: Any, exc: Exception) -> DatabaseCorruptError:
        return DatabaseCorruptError(f"database {self._where}: row {row[0]} of {self._table} holds "
                                    f"an invalid value: {exc}")

    def _decode(self, rows: Iterable[Any],
                build: Callable[[int, Key, Config, tuple[Any, ...]], Any]) -> list[Any]:
        out = []
        for row in rows:
            try:
                row_id, key, config, rest = self._split(row)
            except (TypeError, ValueError) as exc:
                raise self._bad(row, exc) from None
            out.append(build(row_id, key, config, rest))
        return out

    def winners(self, rows: Iterable[Any]) -> list[Winner]:
        return self._decode(rows, lambda _id, key, config, rest: Winner(key, config, *rest))

    def trials(self, rows: Iterable[Any]) -> list[TrialRecord]:
        return self._decode(rows, lambda row_id, key, config, rest:
                            TrialRecord(row_id, rest[0], key, config, *rest[1:]))


def winner_values(winner: Winner) -> dict[str, Any]:
    """The winners-table columns of a Winner (the exchange import writes these)."""
    return {**_key_values(winner.key), **_config_values(winner.config),
            "median_ms": winner.median_ms, "tflops": winner.tflops,
            "kernel_version": winner.kernel_version, "gpu_name": winner.gpu_name,
            "sm_count": winner.sm_count, "driver": winner.driver, "cuda": winner.cuda,
            "triton_version": winner.triton_version, "torch_version": winner.torch_version,
            "host": winner.host, "measured_at": winner.measured_at, "trial_id": winner.trial_id}


def _finite(name: str, value: float | None, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or None, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return float(value)


def _check_run_info(info: RunInfo) -> None:
    if not isinstance(info, RunInfo):
        raise TypeError(f"start_run needs a RunInfo, got {type(info).__name__}")
    for name in ("gpu_name", "arch", "driver", "cuda", "triton_version", "torch_version",
                 "kernel_version", "host"):
        if not isinstance(getattr(info, name), str):
            raise TypeError(f"RunInfo.{name} must be a str, got {getattr(info, name)!r}")
    for name in ("gpu_name", "arch", "kernel_version"):
        if not getattr(info, name).strip():
            raise ValueError(f"RunInfo.{name} must not be empty")
    for name in ("sm_count", "smem_limit"):
        value = getattr(info, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"RunInfo.{name} must be a non-negative int, got {value!r}")
    try:
        json.dumps(info.args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RunInfo.args must be JSON-able: {exc}") from None


# --- engines -----------------------------------------------------------------------------------

def _sqlite_engine(url: str, create: bool, timeout_s: float) -> Engine:
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.exists():
            raise DatabaseUnavailableError(f"database {mask_url(url)}: no file at {path} "
                                           f"(nothing is tuned yet, or FLASHTUNE_DB points elsewhere)")
        if path.exists():
            _check_sqlite_header(path, url)
        elif create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailableError(f"database {mask_url(url)}: cannot create directory "
                                               f"{path.parent}: {exc.strerror or exc}") from None
    if path is None:  # in-memory: one connection holds the whole database
        engine = create_engine(url, poolclass=StaticPool,
                               connect_args={"timeout": timeout_s, "check_same_thread": False})
    else:
        # A pooled connection stays open between writes: closing the last connection of a WAL
        # database checkpoints and deletes the WAL, which would make every commit cost an fsync.
        parsed = parse_url(url)
        if parsed.database and parsed.database.startswith("~"):
            parsed = parsed.set(database=str(path))  # open the file the checks above looked at
        engine = create_engine(parsed, connect_args={"timeout": timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL with NORMAL sync: a commit survives the process being killed (not a power cut),
        # and costs no fsync, which keeps one-commit-per-trial fast.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # VACUUM and friends must run outside a transaction
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("flashtune_write") else "BEGIN")

    return engine


def _use_wal(engine: Engine) -> None:
    # Persistent in the file, so only writers set it, and only once the file is known to be
    # a flashtune database: readers and refused files are left as they were.
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")


def _check_sqlite_header(path: os.PathLike[str], url: str) -> None:
    # SQLite would happily treat a 0-byte file as empty, and reports other junk only at the
    # first query; checking the header up front gives one clear message and writes nothing.
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise DatabaseUnavailableError(f"database {mask_url(url)}: cannot read {path}: "
                                       f"{exc.strerror or exc}") from None
    if head and head != _SQLITE_HEADER:
        raise DatabaseCorruptError(f"database {mask_url(url)}: {path} is not a SQLite file "
                                   f"(its first bytes are {head[:8]!r})")


def _pg_engine(url: str, timeout_s: float) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parse_url(url).query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except ImportError as exc:  # the DBAPI driver is loaded here, not at import of db
        raise DatabaseUnavailableError(
            f"database {mask_url(url)}: its driver is not installed ({exc.name or exc}); "
            "install PostgreSQL support with: pip install 'flashtune[postgres]'") from None


def _make_engine(url: str, create: bool, timeout_s: float) -> Engine:
    expected = "expected sqlite:///PATH or postgresql+psycopg://USER@HOST[:PORT]/DBNAME"
    try:
        backend = parse_url(url).get_backend_name()
        if backend == "sqlite":
            return _sqlite_engine(url, create, timeout_s)
        if backend == "postgresql":
            return _pg_engine(url, timeout_s)
    except ArgumentError as exc:  # an unknown driver name, e.g. postgresql+foo://
        raise ValueError(f"unsupported database URL {mask_url(url)!r} ({exc}); {expected}") from None
    raise ValueError(f"unsupported database URL {mask_url(url)!r}: {expected}")


def _upsert(dialect: str) -> Callable[..., Any]:
    return pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert


# --- the store ---------------------------------------------------------------------------------

class Store:
    """A flashtune database. Open with `Store.open(url)`; close it, or use it as a context manager."""

    def __init__(self, engine: Engine, url: str, schema_version: int) -> None:
        self._engine = engine
        self._url = url
        self._where = mask_url(url)
        self._schema_version = schema_version
        self._runs: dict[int, tuple[str, str, str]] = {}  # run id -> (arch, kernel_version, gpu_name)

    @classmethod
    def open(cls, url: str | None = None, *, create: bool = True,
             timeout_s: float | None = None) -> "Store":
        """Open the database at `url` (default: `db.paths.default_url()`).

        With `create`, a missing SQLite file and a database without flashtune tables get the
        current schema. Without it nothing is ever created or written: a missing file or empty
        database is DatabaseUnavailableError. An older or newer schema is SchemaVersionError.
        """
        url = default_url() if url is None else str(url)
        timeout = timeout_s if timeout_s is not None else (WRITE_TIMEOUT_S if create else READ_TIMEOUT_S)
        where = mask_url(url)
        engine = _make_engine(url, create, timeout)
        try:
            with translated(url, "opening"):
                version = ensure(engine, where, create=create, write_options=_WRITE)
                if create:
                    _use_wal(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url, version)

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
        return self._engine.connect().execution_options(**_WRITE)

    # --- runs and trials -------------------------------------------------------------------

    def start_run(self, info: RunInfo) -> int:
        """Record the start of a tuning run; its id."""
        _check_run_info(info)
        values = {name: getattr(info, name) for name in (
            "gpu_name", "arch", "sm_count", "smem_limit", "driver", "cuda", "triton_version",
            "torch_version", "kernel_version", "host")}
        with translated(self._url, "starting a run"), self._write() as conn, conn.begin():
            run_id = conn.execute(_RUNS.insert().values(
                **values, args=dict(info.args), status="running", started_at=utcnow())
                .returning(_RUNS.c.id)).scalar_one()
        self._runs[run_id] = (info.arch.strip(), info.kernel_version, info.gpu_name)
        return run_id

    def finish_run(self, run_id: int, status: str = "done") -> None:
        """Mark a run finished ('done', 'interrupted', 'failed', ...) now."""
        if not isinstance(status, str) or not status.strip() or len(status) > 32:
            raise ValueError(f"run status must be a short non-empty str, got {status!r}")
        with translated(self._url, "finishing a run"), self._write() as conn, conn.begin():
            count = conn.execute(update(_RUNS).where(_RUNS.c.id == run_id)
                                 .values(status=status, finished_at=utcnow())).rowcount
        if not count:
            raise ValueError(f"no run with id {run_id!r} in {self._where}")

    def _run(self, run_id: int) -> tuple[str, str, str]:
        if run_id not in self._runs:
            with translated(self._url, "reading a run"), self._read() as conn:
                row = conn.execute(select(_RUNS.c.arch, _RUNS.c.kernel_version, _RUNS.c.gpu_name)
                                   .where(_RUNS.c.id == run_id)).first()
            if row is None:
                raise ValueError(f"no run with id {run_id!r} in {self._where}")
            self._runs[run_id] = (row.arch, row.kernel_version, row.gpu_name)
        return self._runs[run_id]

    def record_trial(self, run_id: int, key: Key, config: Config, outcome: str, *,
                     median_ms: float | None = None, tflops: float | None = None,
                     compile_s: float | None = None, error: str | None = None) -> TrialRecord:
        """Store one trial in its own transaction; kernel version and GPU name come from the run."""
        if not isinstance(key, Key) or not isinstance(config, Config):
            raise TypeError(f"record_trial needs a Key and a Config, got {type(key).__name__} "
                            f"and {type(config).__name__}")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown trial outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
        median_ms = _finite("median_ms", median_ms, positive=True)
        tflops = _finite("tflops", tflops)
        compile_s = _finite("compile_s", compile_s)
        if outcome == "ok" and median_ms is None:
            raise ValueError("an 'ok' trial needs its median_ms")
        if error is not None and not isinstance(error, str):
            raise TypeError(f"error must be a str or None, got {type(error).__name__}")
        arch, kernel_version, gpu_name = self._run(run_id)
        if arch != key.arch:
            raise ValueError(f"trial key {key} is for {key.arch} but run {run_id} ran on {arch}")
        created = utcnow()
        with translated(self._url, "recording a trial"), self._write() as conn, conn.begin():
            trial_id = conn.execute(_INSERT_TRIAL, {
                "run_id": run_id, **_key_values(key), **_config_values(config), "outcome": outcome,
                "median_ms": median_ms, "tflops": tflops, "compile_s": compile_s, "error": error,
                "kernel_version": kernel_version, "gpu_name": gpu_name, "created_at": created}
                ).scalar_one()
        return TrialRecord(trial_id, run_id, key, config, outcome, median_ms, tflops, compile_s,
                           error, kernel_version, gpu_name, created)

    def trials(self, key: Key | None = None, *, arch: str | None = None,
               kernel_version: str | None = None, gpu_name: str | None = None,
               outcome: str | None = None) -> list[TrialRecord]:
        """Trials matching every filter given, oldest first."""
        query = select(*_TRIAL_COLUMNS)
        if key is not None:
            query = query.where(*(getattr(_TRIALS.c, c) == v for c, v in _key_values(key).items()))
        if arch is not None:
            query = query.where(_TRIALS.c.arch == normalize_arch(arch))
        if kernel_version is not None:
            query = query.where(_TRIALS.c.kernel_version == kernel_version)
        if gpu_name is not None:
            query = query.where(_TRIALS.c.gpu_name == gpu_name)
        if outcome is not None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown trial outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
            query = query.where(_TRIALS.c.outcome == outcome)
        with translated(self._url, "reading trials"), self._read() as conn:
            rows = conn.execute(query.order_by(_TRIALS.c.id)).all()
        return _Decoder(_TRIALS.name, self._where).trials(rows)

    # --- winners ---------------------------------------------------------------------------

    def offer_winner(self, trial: TrialRecord, *, replace: bool = False) -> bool:
        """Make an `ok` trial its key's winner if there is none, it is faster, the current one is
        from another kernel version, or `replace`; whether the winner changed. Non-ok: False."""
        if not isinstance(trial, TrialRecord):
            raise TypeError(f"offer_winner needs a TrialRecord, got {type(trial).__name__}")
        if trial.outcome != "ok" or trial.median_ms is None:
            return False
        provenance: dict[str, Any] = dict.fromkeys(
            ("sm_count", "driver", "cuda", "triton_version", "torch_version", "host"))
        with translated(self._url, "setting a winner"), self._write() as conn, conn.begin():
            if trial.run_id is not None:
                row = conn.execute(select(_RUNS).where(_RUNS.c.id == trial.run_id)).first()
                if row is not None:
                    provenance = {name: getattr(row, name) for name in provenance}
            values = {**_key_values(trial.key), **_config_values(trial.config),
                      "median_ms": trial.median_ms, "tflops": trial.tflops,
                      "kernel_version": trial.kernel_version, "gpu_name": trial.gpu_name,
                      **provenance, "measured_at": trial.created_at, "trial_id": trial.id}
            insert = _upsert(conn.dialect.name)(_WINNERS).values(**values)
            better = None if replace else or_(
                _WINNERS.c.median_ms > insert.excluded.median_ms,
                _WINNERS.c.kernel_version != insert.excluded.kernel_version)
            statement = insert.on_conflict_do_update(
                index_elements=list(KEY_COLUMNS),
                set_={name: insert.excluded[name] for name in values if name not in KEY_COLUMNS},
                where=better).returning(_WINNERS.c.id)
            return conn.execute(statement).first() is not None

    def winners(self, arch: str | None = None, *, op: str | None = None, dtype: str | None = None,
                head_dim: int | None = None, causal: bool | None = None) -> list[Winner]:
        """Winners matching every filter given, ordered by key."""
        query = select(*_WINNER_COLUMNS)
        if arch is not None:
            query = query.where(_WINNERS.c.arch == normalize_arch(arch))
        if op is not None:
            query = query.where(_WINNERS.c.op == normalize_op(op))
        if dtype is not None:
            query = query.where(_WINNERS.c.dtype == normalize_dtype(dtype))
        if head_dim is not None:
            query = query.where(_WINNERS.c.head_dim == head_dim)
        if causal is not None:
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
        return self._select_winners(select(*_WINNER_COLUMNS).where(_WINNERS.c.arch.in_(sorted(set(names)))))

    def _select_winners(self, query: Any) -> list[Winner]:
        order = [getattr(_WINNERS.c, c) for c in KEY_COLUMNS]
        with translated(self._url, "reading winners"), self._read() as conn:
            rows = conn.execute(query.order_by(*order)).all()
        return _Decoder(_WINNERS.name, self._where).winners(rows)

    def merge_winners(self, archs: Iterable[str],
                      plan: Callable[[Mapping[Key, Winner]], Sequence[Winner]], *,
                      dry_run: bool = False) -> None:
        """In one write transaction: read the winners of `archs`, ask `plan` which winners to write
        given them, and write those (each replacing its key's row). `dry_run` writes nothing."""
        names = sorted({normalize_arch(a) for a in archs})
        with translated(self._url, "merging winners"), self._write() as conn, conn.begin() as tx:
            rows = conn.execute(select(*_WINNER_COLUMNS).where(_WINNERS.c.arch.in_(names))).all()
            existing = {w.key: w for w in _Decoder(_WINNERS.name, self._where).winners(rows)}
            chosen = plan(existing)
            if dry_run or not chosen:
                tx.rollback()
                return
            upsert = _upsert(conn.dialect.name)
            for winner in chosen:
                values = winner_values(winner)
                insert = upsert(_WINNERS).values(**values)
                conn.execute(insert.on_conflict_do_update(
                    index_elements=list(KEY_COLUMNS),
                    set_={name: insert.excluded[name] for name in values if name not in KEY_COLUMNS}))

    # --- maintenance -----------------------------------------------------------------------

    def prune(self, keep_kernel_version: str) -> tuple[int, int]:
        """Delete the trials, winners and runs of every other kernel version; (trials, winners) deleted."""
        if not isinstance(keep_kernel_version, str) or not keep_kernel_version.strip():
            raise ValueError(f"prune needs the kernel version to keep, got {keep_kernel_version!r}")
        with translated(self._url, "pruning"), self._write() as conn, conn.begin():
            winners = conn.execute(delete(_WINNERS).where(
                _WINNERS.c.kernel_version != keep_kernel_version)).rowcount
            trials = conn.execute(delete(_TRIALS).where(
                _TRIALS.c.kernel_version != keep_kernel_version)).rowcount
            conn.execute(delete(_RUNS).where(_RUNS.c.kernel_version != keep_kernel_version))
        self._runs = {k: v for k, v in self._runs.items() if v[1] == keep_kernel_version}
        return trials, winners

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


def migrate_database(url: str | None = None) -> tuple[int | None, int]:
    """Create or migrate the schema at `url` to the current version; (old version or None, new)."""
    url = default_url() if url is None else str(url)
    engine = _make_engine(url, True, WRITE_TIMEOUT_S)
    try:
        with translated(url, "migrating"):
            versions = migrate(engine, mask_url(url), write_options=_WRITE)
            _use_wal(engine)
            return versions
    finally:
        engine.dispose()


def load_winners(archs: Iterable[str], url: str | None = None) -> list[Winner]:
    """The dispatcher's import-time read: the winners of `archs` in one query, creating nothing.

    Raises DatabaseUnavailableError (missing, locked, unreachable), DatabaseCorruptError or
    SchemaVersionError; the caller falls back to defaults with a warning.
    """
    archs = list(archs)
    with Store.open(url, create=False) as store:
        return store.winners_for_archs(archs)

