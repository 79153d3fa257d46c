"""Many rows through one statement: compiled once, parameters converted up front, one executemany.

An import writes tens of thousands of winners inside the write lock. Handed a list of dicts,
SQLAlchemy builds and converts every row's parameters inside `execute`, which costs more than
SQLite's own work. A `BulkStatement` compiles its statement once for the engine's dialect,
converts the parameter sets with the columns' own bind processors (the same conversion SQLAlchemy
applies, so the stored text of a date is identical) before the transaction opens, and hands them
to the driver's `executemany` as they are.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import ClauseElement


class BulkStatement:
    """A statement whose parameters are all bind parameters (`bindparam(name)`), for one dialect."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self._sql = str(compiled)
        self._positional = bool(compiled.positional)
        names = list(compiled.positiontup or ()) if self._positional else list(compiled.binds)
        self._converters = [(name, compiled.binds[name].type.bind_processor(dialect)) for name in names]

    def parameters(self, rows: Iterable[Mapping[str, Any]]) -> list[Any]:
        """Each row's values in the driver's form: a tuple (positional paramstyle) or a dict."""
        converters = self._converters
        if self._positional:
            return [tuple(value if convert is None or value is None else convert(value)
                          for name, convert in converters for value in (row[name],)) for row in rows]
        return [{name: row[name] if convert is None or row[name] is None else convert(row[name])
                 for name, convert in converters} for row in rows]

    def execute(self, conn: Connection, parameters: list[Any]) -> None:
        """Run the statement once per parameter set, in the connection's transaction."""
        if parameters:
            conn.exec_driver_sql(self._sql, parameters)
