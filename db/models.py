"""The tables: schema meta, tuning runs, trials (every config tried), winners (best per key), recorded
shapes, and fleet jobs (a job, its claim units and its keys).

One set of models serves SQLite and PostgreSQL. Table names carry a `flashtune_` prefix so that
a fleet can share a PostgreSQL database with other applications. A config is stored as its four
integers plus `config_extra`, the canonical JSON text of its kernel-variant knobs, so that equal
configs are equal rows and the columns stay queryable.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Double, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .types import FEATURES, MAX_OP_TEXT

# `batch_heads` (the B·Hq bucket) and `group` (Hq/Hkv) joined the key in schema version 2, the
# attention features (`types.FEATURES`: window, softcap, sinks, alibi, dropout, mask) in version 4, and
# the packed call's token bucket and the paged cache's page size in version 5.
KEY_COLUMNS: tuple[str, ...] = ("arch", "op", "seq_len", "seq_len_kv", "head_dim", "dtype", "causal",
                                "batch_heads", "group", *FEATURES)
FEATURES_SINCE = 4  # the schema version whose key columns include the first attention features
# The schema version each feature column joined the key in: a database before it reads the column's default.
FEATURE_SINCE: dict[str, int] = {name: 5 if name in ("tokens", "page_size") else FEATURES_SINCE
                                 for name in FEATURES}
CONFIG_COLUMNS: tuple[str, ...] = ("block_m", "block_n", "num_warps", "num_stages", "config_extra")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone, PostgreSQL converts)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if not isinstance(value, datetime):
            return value  # None, or a damaged value for the row decoder to report
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def result_processor(self, dialect: Any, coltype: Any) -> Optional[Callable[[Any], Any]]:
        # A stored text that is no date ('yesterday', a year past 9999) must not abort the whole
        # query: the raw value comes back as it is, and the row decoder reports that one row.
        process = super().result_processor(dialect, coltype)
        if process is None:
            return None

        def tolerant(value: Any) -> Any:
            try:
                return process(value)
            except (ValueError, TypeError, OverflowError):
                return value
        return tolerant


class Flag(TypeDecorator[bool]):
    """A Boolean that reads back only 0/1 (or true/false) as a bool: SQLite would turn any stored
    text into True, and the row decoder must see a damaged value to report it."""

    impl = Boolean
    cache_ok = True

    def result_processor(self, dialect: Any, coltype: Any) -> Optional[Callable[[Any], Any]]:
        # `in (0, 1)` compares by value, so True and False pass as well.
        return lambda value: bool(value) if value in (0, 1) else value


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class KeyColumns:
    """The key (KEY_COLUMNS): trials, winners and recorded shapes all carry it."""

    arch: Mapped[str] = mapped_column(String(16))
    op: Mapped[str] = mapped_column(String(MAX_OP_TEXT))  # 8 characters before schema 5
    seq_len: Mapped[int] = mapped_column(Integer)
    seq_len_kv: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    causal: Mapped[bool] = mapped_column(Flag)
    batch_heads: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    group: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # quoted in SQL: a keyword
    # The attention features (schema 4); the server defaults are "off", what every older row meant.
    window: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # a keyword too
    softcap: Mapped[bool] = mapped_column(Flag, default=False, server_default=false())
    sinks: Mapped[bool] = mapped_column(Flag, default=False, server_default=false())
    alibi: Mapped[bool] = mapped_column(Flag, default=False, server_default=false())
    dropout: Mapped[bool] = mapped_column(Flag, default=False, server_default=false())
    mask: Mapped[str] = mapped_column(String(8), default="none", server_default="none")  # one of MASKS
    # Schema 5: a packed call's total-token bucket and a paged cache's page size (0: neither).
    tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    page_size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class KeyConfigColumns(KeyColumns):
    """The key (KEY_COLUMNS) and the config (CONFIG_COLUMNS) that trials and winners both carry."""

    block_m: Mapped[int] = mapped_column(Integer)
    block_n: Mapped[int] = mapped_column(Integer)
    num_warps: Mapped[int] = mapped_column(Integer)
    num_stages: Mapped[int] = mapped_column(Integer)
    config_extra: Mapped[str] = mapped_column(Text, default="{}")


class MetaRow(Base):
    """Key/value facts about the database itself; `schema_version` is the one that matters."""

    __tablename__ = "flashtune_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class RunRow(Base):
    """One `tune` invocation and the machine and software it ran on."""

    __tablename__ = "flashtune_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    gpu_name: Mapped[str] = mapped_column(String(128))
    arch: Mapped[str] = mapped_column(String(16))
    sm_count: Mapped[int] = mapped_column(Integer)
    smem_limit: Mapped[int] = mapped_column(Integer)
    driver: Mapped[str] = mapped_column(String(64))
    cuda: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(64))
    kernel_version: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(255))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)


class TrialRow(KeyConfigColumns, Base):
    """One config tried for one key, whatever its outcome."""

    __tablename__ = "flashtune_trials"
    __table_args__ = (
        # The tuner's resume lookup (which configs of this key were already tried).
        Index("ix_flashtune_trials_key", *KEY_COLUMNS, "kernel_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("flashtune_runs.id", ondelete="SET NULL"), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(32))
    median_ms: Mapped[Optional[float]] = mapped_column(Double, nullable=True)
    tflops: Mapped[Optional[float]] = mapped_column(Double, nullable=True)
    compile_s: Mapped[Optional[float]] = mapped_column(Double, nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    kernel_version: Mapped[str] = mapped_column(String(64), index=True)
    gpu_name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WinnerRow(KeyConfigColumns, Base):
    """The best `ok` trial per key, with the provenance of its measurement.

    The unique key leads with `arch`, so its index serves the dispatcher's one query by arch.
    `kernel_version` sits beside the key so that a stale winner is visible, not a second row.
    """

    __tablename__ = "flashtune_winners"
    __table_args__ = (UniqueConstraint(*KEY_COLUMNS, name="uq_flashtune_winners_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    median_ms: Mapped[float] = mapped_column(Double)
    tflops: Mapped[Optional[float]] = mapped_column(Double, nullable=True)
    kernel_version: Mapped[str] = mapped_column(String(64))
    gpu_name: Mapped[str] = mapped_column(String(128))
    sm_count: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    driver: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    cuda: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    triton_version: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    torch_version: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    host: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The best kernel config of the key, canonical text; NULL when the kernel itself won (the config
    # columns hold it). Set when an SDPA backend won: what a call runs when the backend refuses it.
    kernel_config: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # Indexed so that deleting trials (prune) need not scan the winners for each one.
    trial_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("flashtune_trials.id", ondelete="SET NULL"), nullable=True, index=True)


class RecordedRow(KeyColumns, Base):
    """A key that an app's calls resolved to under FLASHTUNE_RECORD=1, and how often."""

    __tablename__ = "flashtune_recorded"
    __table_args__ = (UniqueConstraint(*KEY_COLUMNS, name="uq_flashtune_recorded_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


# --- fleet jobs (schema version 3): a job's keys as a queue that workers on many hosts claim ----------

class JobRow(Base):
    """A fleet tuning job: one arch's keys, tuned by whichever workers join it (`tune --job/--join`)."""

    __tablename__ = "flashtune_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    arch: Mapped[str] = mapped_column(String(16))
    # Workers of another kernel version would store winners of another kernel: they are refused.
    kernel_version: Mapped[str] = mapped_column(String(64))
    lease_s: Mapped[float] = mapped_column(Double)
    args: Mapped[dict[str, Any]] = mapped_column(JSON)  # what every worker must tune alike (kernel_only, ...)
    status: Mapped[str] = mapped_column(String(16), default="open")  # 'open' | 'done'
    host: Mapped[str] = mapped_column(String(255))  # where it was created
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)


class JobUnitRow(Base):
    """What one claim takes: a job's keys that share a sibling ranking (they differ only in their B·Hq
    bucket), with the claim's holder and lease. `family` numbers the keys that share compiled kernels
    (all but N and the bucket): a worker keeps to its family, so its compiled kernels are reused."""

    __tablename__ = "flashtune_job_units"
    __table_args__ = (Index("ix_flashtune_job_units_queue", "job_id", "state", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("flashtune_jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    family: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # 'pending' | 'claimed' | 'done'
    claim_token: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    host: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    gpu: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    gpu_name: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)
    claims: Mapped[int] = mapped_column(Integer, default=0)
    claimed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)


class JobKeyRow(KeyColumns, Base):
    """One key of a job, done or not, and who finished it."""

    __tablename__ = "flashtune_job_keys"
    __table_args__ = (UniqueConstraint("job_id", *KEY_COLUMNS, name="uq_flashtune_job_keys_key"),
                      Index("ix_flashtune_job_keys_unit", "unit_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("flashtune_jobs.id", ondelete="CASCADE"))
    unit_id: Mapped[int] = mapped_column(ForeignKey("flashtune_job_units.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # 'pending' | 'done'
    host: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    gpu: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    done_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)


JOB_TABLES: tuple[str, ...] = (JobRow.__tablename__, JobUnitRow.__tablename__, JobKeyRow.__tablename__)
FLASHTUNE_TABLES: tuple[str, ...] = tuple(Base.metadata.tables)
