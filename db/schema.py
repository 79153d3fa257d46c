"""Schema versions and migrations: one integer in `flashtune_meta`, and an ordered list of steps.

The mechanism, kept small on purpose (no Alembic needed on GPU machines):
- `SCHEMA_VERSION` is the version these models describe. A new database is created from the
  models directly and stamped with it.
- `MIGRATIONS[i]` takes a database from version `MIGRATIONS[i].version - 1` to `.version`; a
  schema change adds one step here and bumps `SCHEMA_VERSION`. Steps run in order, all in one
  transaction (DDL is transactional on SQLite and PostgreSQL), so a failed migration leaves the
  database at its old version.
- Opening a database refuses a newer version (naming both) and an older one (naming the command,
  `flashtune db migrate`): readers such as the dispatcher must never write, and a fleet's shared
  database is migrated once, on purpose. A read-only open also takes versions from `READABLE_SINCE`
  on, whose tables it reads are unchanged or only lack key columns with defaults (the store reads the
  defaults in their place; what needs a newer table checks `Store.schema_version`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sqlalchemy import Connection, Engine, UniqueConstraint, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from .errors import DatabaseCorruptError, DatabaseUnavailableError, SchemaVersionError
from .models import FLASHTUNE_TABLES, Base, MetaRow
from .text import printable, shown

SCHEMA_VERSION = 5
# The oldest version a read-only open accepts as it is: version 3 only added the fleet's job tables,
# and versions 4 and 5 only key columns whose defaults are what every older row meant (the store reads those
# defaults in their place; version 5 also widened the op column, which reading does not notice), so an app whose database is still at 2 keeps its tuned winners until
# someone migrates it.
READABLE_SINCE = 2
VERSION_KEY = "schema_version"
MIGRATE_COMMAND = "flashtune db migrate"
REPAIR_OPTION = "--repair"
_LISTED_IDS = 10
# Any constant: serialises schema creation between processes on one PostgreSQL server.
_PG_SCHEMA_LOCK = 0x666C6173


@dataclass(frozen=True)
class Migration:
    """One step: `apply` turns a database at `version - 1` into one at `version`."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _to_v2(conn: Connection) -> None:
    """Schema 2: the workload joins the key (`batch_heads`, 0 for the old rows: not recorded; `group`,
    1: the old tuner timed plain multi-head inputs), winners carry `kernel_config`, and the
    `recorded` table holds the keys apps ran under FLASHTUNE_RECORD=1."""
    from .models import KEY_COLUMNS, RecordedRow, TrialRow, WinnerRow
    from .types import FEATURES

    # Schema 2's key: the features came later (_to_v4 adds them to the tables made here from today's models).
    key_v2 = ", ".join(f'"{c}"' for c in KEY_COLUMNS if c not in FEATURES)
    trials, winners = TrialRow.__table__.name, WinnerRow.__table__.name
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_flashtune_trials_key")
    for column in ('batch_heads INTEGER NOT NULL DEFAULT 0', '"group" INTEGER NOT NULL DEFAULT 1'):
        conn.exec_driver_sql(f"ALTER TABLE {trials} ADD COLUMN {column}")
    conn.exec_driver_sql(f"CREATE INDEX ix_flashtune_trials_key ON {trials} ({key_v2}, kernel_version)")
    if conn.dialect.name == "postgresql":
        for column in ('batch_heads INTEGER NOT NULL DEFAULT 0', '"group" INTEGER NOT NULL DEFAULT 1',
                       "kernel_config TEXT"):
            conn.exec_driver_sql(f"ALTER TABLE {winners} ADD COLUMN {column}")
        conn.exec_driver_sql(f"ALTER TABLE {winners} DROP CONSTRAINT uq_flashtune_winners_key")
        conn.exec_driver_sql(f"ALTER TABLE {winners} ADD CONSTRAINT uq_flashtune_winners_key UNIQUE ({key_v2})")
    else:
        # SQLite cannot drop a table constraint: rebuild the table (inside this transaction).
        old = [c.name for c in WinnerRow.__table__.columns
               if c.name not in ("batch_heads", "group", "kernel_config", *FEATURES)]
        conn.exec_driver_sql(f"ALTER TABLE {winners} RENAME TO {winners}_v1")
        for index in WinnerRow.__table__.indexes:
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
        WinnerRow.__table__.create(conn)
        names = ", ".join(f'"{c}"' for c in old)
        conn.exec_driver_sql(f"INSERT INTO {winners} ({names}) SELECT {names} FROM {winners}_v1")
        conn.exec_driver_sql(f"DROP TABLE {winners}_v1")
    RecordedRow.__table__.create(conn)


def _to_v3(conn: Connection) -> None:
    """Schema 3: fleet jobs, new tables only (`flashtune_jobs`, `_job_units`, `_job_keys`); nothing
    stored changes."""
    from .models import JobKeyRow, JobRow, JobUnitRow

    for model in (JobRow, JobUnitRow, JobKeyRow):  # in foreign-key order
        model.__table__.create(conn, checkfirst=True)  # a database taken back by hand may still have them


def _add_key_columns(conn: Connection, names: Sequence[str]) -> None:
    """Add the key columns `names` to trials, winners, recorded keys and job keys, every old row "off" (the
    columns' defaults), and rebuild the unique keys of winners, recorded keys and job keys to include them. A
    table that earlier steps made from today's models has the columns already: only the missing ones are
    added, and every present one is kept. The op column takes today's width (PostgreSQL enforces it)."""
    from .models import JobKeyRow, RecordedRow, TrialRow, WinnerRow

    ddl = conn.dialect.ddl_compiler(conn.dialect, None)
    postgres = conn.dialect.name == "postgresql"

    def present(table: Any) -> set[str]:
        return {column["name"] for column in inspect(conn).get_columns(table.name)}

    def add_columns(table: Any) -> None:
        for name in [c for c in names if c not in present(table)]:
            # The models' own column DDL: the type, NOT NULL and the server default.
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl.get_column_specification(table.c[name])}")
        if postgres:
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN op TYPE "
                                 f"{table.c['op'].type.compile(dialect=conn.dialect)}")

    trials = TrialRow.__table__
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_flashtune_trials_key")
    add_columns(trials)
    next(i for i in trials.indexes if i.name == "ix_flashtune_trials_key").create(conn)
    for table in (WinnerRow.__table__, RecordedRow.__table__, JobKeyRow.__table__):
        unique = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
        if postgres:
            add_columns(table)
            for constraint in unique:
                # Raw DDL: sqlalchemy's AddConstraint would leave the constraint out of every later CREATE TABLE.
                columns = ", ".join(f'"{c.name}"' for c in constraint.columns)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} DROP CONSTRAINT {constraint.name}")
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD CONSTRAINT {constraint.name} UNIQUE ({columns})")
            continue
        # SQLite cannot change a table constraint: rebuild the table (inside this transaction). Nothing
        # refers to these tables, so renaming them rewrites no other table's foreign key.
        old = [c.name for c in table.columns if c.name in present(table)]
        conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {table.name}_old")
        for index in table.indexes:
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
        table.create(conn)
        names_sql = ", ".join(f'"{c}"' for c in old)
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({names_sql}) SELECT {names_sql} FROM {table.name}_old")
        conn.exec_driver_sql(f"DROP TABLE {table.name}_old")


def _to_v4(conn: Connection) -> None:
    """Schema 4: the attention features (window, softcap, sinks, alibi, dropout, mask) join the key. Today's
    models define the unique keys and the trials' index with every later key column too, so this step adds
    all of `types.FEATURES` at once (migrations always run on to SCHEMA_VERSION in the same transaction)."""
    from .types import FEATURES

    _add_key_columns(conn, FEATURES)


def _to_v5(conn: Connection) -> None:
    """Schema 5: a packed call's token bucket and a paged cache's page size join the key; the op column widens
    to 16 characters (varlen_bwd). A database that _to_v4 just migrated has the columns already."""
    from .types import FEATURES

    _add_key_columns(conn, FEATURES)


MIGRATIONS: list[Migration] = [
    Migration(2, "workload keys (batch_heads, group), winners' kernel_config, the recorded table", _to_v2),
    Migration(3, "fleet jobs: the jobs, job_units and job_keys tables", _to_v3),
    Migration(4, "attention features in the key (window, softcap, sinks, alibi, dropout, mask)", _to_v4),
    Migration(5, "packed and paged keys (tokens, page_size); a wider op column", _to_v5),
]


def _present_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names()) & set(FLASHTUNE_TABLES)


def _parse_version(value: object, where: str) -> int:
    # The column is text. ASCII digits only, and few of them: int() would take '²', or refuse
    # 5,000 digits with an error of its own.
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,9}", value):
        raise DatabaseCorruptError(f"database {where} has no valid {VERSION_KEY} in "
                                   f"{MetaRow.__tablename__} (found {printable(shown(value))})")
    return int(value)


def _select_version(conn: Connection) -> object:
    meta = MetaRow.__table__  # Core, not ORM: see store.py
    return conn.execute(select(meta.c.value).where(meta.c.name == VERSION_KEY)).scalar()


def inspect_version(conn: Connection, where: str) -> int | None:
    """The stored schema version, looking at the tables first; None when there are none."""
    present = _present_tables(conn)
    if not present:
        return None
    if MetaRow.__tablename__ not in present:
        raise DatabaseCorruptError(f"database {where} has flashtune tables but no "
                                   f"{MetaRow.__tablename__} table: not a complete flashtune database")
    return _parse_version(_select_version(conn), where)


def read_version(conn: Connection, where: str) -> int | None:
    """The stored schema version in one query (the fast path at every app import); None when the
    database holds no flashtune tables. `conn` must not be inside a `begin()` block."""
    try:
        value = _select_version(conn)
    except SQLAlchemyError as first:
        conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
        try:
            present = _present_tables(conn)
        except SQLAlchemyError:
            raise first from None
        if MetaRow.__tablename__ in present:
            raise
        return inspect_version(conn, where)
    return _parse_version(value, where)


def check_version(version: int | None, where: str, create: bool) -> None:
    """Raise unless a database at `version` can be used as it is: for writing (`create`) only at
    SCHEMA_VERSION, for reading from READABLE_SINCE on."""
    if version is None:
        if not create:
            raise DatabaseUnavailableError(f"database {where} holds no flashtune tables yet "
                                           f"(run `flashtune tune` or `{MIGRATE_COMMAND}` to create them)")
        return
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"database {where} has schema version {version}, newer than "
                                 f"version {SCHEMA_VERSION} that this flashtune understands: "
                                 f"upgrade flashtune")
    if version < SCHEMA_VERSION and (create or version < READABLE_SINCE):
        raise SchemaVersionError(f"database {where} has schema version {version}, older than "
                                 f"version {SCHEMA_VERSION} that this flashtune needs: run "
                                 f"`{MIGRATE_COMMAND} --db URL` to migrate it")


def _lock_schema(conn: Connection) -> None:
    # SQLite's write transactions already begin IMMEDIATE (see store.py); PostgreSQL needs a lock
    # so that two first-time writers do not both create the tables.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})


def _stamp(conn: Connection, version: int) -> None:
    meta = MetaRow.__table__
    updated = conn.execute(meta.update().where(meta.c.name == VERSION_KEY)
                           .values(value=str(version))).rowcount
    if not updated:
        conn.execute(meta.insert().values(name=VERSION_KEY, value=str(version)))


@dataclass(frozen=True)
class Orphans:
    """Rows of `table` whose `column` names a row of `parent` that is gone (deleted by hand, with
    SQLite's foreign keys off): a migration that copies the table would fail on them."""

    table: str
    column: str
    parent: str
    ids: tuple[int, ...]
    detach: bool  # the key is cleared (ON DELETE SET NULL), else the row is removed (CASCADE)

    def __str__(self) -> str:
        listed = ", ".join(map(str, self.ids[:_LISTED_IDS]))
        more = f" (and {len(self.ids) - _LISTED_IDS} more)" if len(self.ids) > _LISTED_IDS else ""
        return f"{self.table} row(s) {listed}{more}: {self.column} names a missing {self.parent} row"

    @property
    def repair(self) -> str:
        """What `--repair` does to them."""
        action = f"cleared {self.column} of" if self.detach else "removed"
        return f"{action} {len(self.ids)} {self.table} row(s) whose {self.parent} row is missing"


def find_orphans(conn: Connection) -> list[Orphans]:
    """Every row whose foreign key names a row that does not exist, per table and column."""
    present = _present_tables(conn)
    found = []
    for table in Base.metadata.sorted_tables:
        if table.name not in present:
            continue
        columns = {column["name"] for column in inspect(conn).get_columns(table.name)}
        for fk in table.foreign_keys:
            column, parent = fk.parent.name, fk.column.table.name
            if parent not in present or column not in columns:
                continue
            ids = conn.exec_driver_sql(
                f'SELECT id FROM {table.name} AS t WHERE "{column}" IS NOT NULL AND NOT EXISTS '
                f'(SELECT 1 FROM {parent} AS p WHERE p.id = t."{column}") ORDER BY id').scalars().all()
            if ids:
                found.append(Orphans(table.name, column, parent, tuple(ids), fk.ondelete == "SET NULL"))
    return found


def _repair(conn: Connection, orphans: Sequence[Orphans]) -> None:
    for orphan in orphans:
        ids = ", ".join(map(str, orphan.ids))  # ints read from the database just now
        if orphan.detach:
            conn.exec_driver_sql(f'UPDATE {orphan.table} SET "{orphan.column}" = NULL WHERE id IN ({ids})')
        else:
            conn.exec_driver_sql(f"DELETE FROM {orphan.table} WHERE id IN ({ids})")


def _check_orphans(conn: Connection, where: str, repair: bool, report: Callable[[str], None]) -> None:
    """Refuse (naming the rows) or, with `repair`, clear rows whose foreign key names a missing row."""
    for _ in range(len(FLASHTUNE_TABLES)):  # removing a row may leave its own children orphaned
        orphans = find_orphans(conn)
        if not orphans:
            return
        if not repair:
            raise DatabaseCorruptError(
                f"database {where}: {'; '.join(map(str, orphans))}; nothing migrated: run "
                f"`{MIGRATE_COMMAND} {REPAIR_OPTION}` to clear these keys and remove rows that cannot stand "
                "alone (see docs/database.md), or fix the rows by hand")
        _repair(conn, orphans)
        for orphan in orphans:
            report(orphan.repair)


def migrate(engine: Engine, where: str, *, write_options: dict[str, object], repair: bool = False,
            report: Callable[[str], None] = lambda _: None) -> tuple[int | None, int]:
    """Create or migrate the schema to SCHEMA_VERSION in one transaction; (old version, new).

    Before migrating (or whenever `repair` is given), rows whose foreign key names a missing row are
    refused, naming them; with `repair` they are detached or removed and each change is `report`ed."""
    with engine.connect().execution_options(**write_options) as conn:
        with conn.begin():
            _lock_schema(conn)
            version = inspect_version(conn, where)
            if version is None:
                Base.metadata.create_all(conn)
                _stamp(conn, SCHEMA_VERSION)
                return None, SCHEMA_VERSION
            old = version
            if version > SCHEMA_VERSION:
                check_version(version, where, create=True)
            if version < SCHEMA_VERSION or repair:
                _check_orphans(conn, where, repair, report)
            for step in MIGRATIONS:
                if version < step.version <= SCHEMA_VERSION:
                    if step.version != version + 1:
                        raise SchemaVersionError(f"no migration from schema version {version} to "
                                                 f"{version + 1} (next step is {step.version})")
                    step.apply(conn)
                    version = step.version
                    _stamp(conn, version)
            if version != SCHEMA_VERSION:
                raise SchemaVersionError(f"database {where} stopped at schema version {version}: "
                                         f"no migration reaches version {SCHEMA_VERSION}")
            return old, version


def ensure(engine: Engine, where: str, *, create: bool, write_options: dict[str, object]) -> int:
    """Check the schema; with `create`, make the tables of a database that has none. The version."""
    with engine.connect() as conn:
        version = read_version(conn, where)
        conn.rollback()
    if version is None and create:
        _, version = migrate(engine, where, write_options=write_options)
        return version
    check_version(version, where, create)
    return version if version is not None else SCHEMA_VERSION
