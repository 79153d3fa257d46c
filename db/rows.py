"""Stored rows to values: every column checked, and a damaged row reported as data, not raised.

A row can be damaged by hand, by another program or by a disk: `config_extra` that is valid JSON
but no object, a date that is no date, `median_ms='fast'` (SQLite stores text in a REAL column),
an unknown arch, a label with control characters. Reading must not let one such row break a
command or the dispatcher's import, nor hand out a value that fails later (a time that cannot be
formatted, a config that cannot launch). So each row is decoded column by column with the same
checks the values are built with (`Key`, `Config`, the label rule of `db.text`); a row that fails
one is skipped and recorded as a `DamagedRow` naming its table, id and column. The store gathers
them and warns once per read with `DamagedRowWarning` (see `Store.damaged_rows`).

A `RowSpec` lists a query's columns in order, grouped into the values they decode to: the key
columns make one `Key`, the config columns one `Config`, any other column one value. A new key
column (schema version 2) is one more name in `models.KEY_COLUMNS` and one more `Key` field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Callable, Iterable, Sequence

from .models import CONFIG_COLUMNS, KEY_COLUMNS
from .text import label_problem, printable, shown
from .types import INT32_MAX, OUTCOMES, Config, InvalidField, Key

_SHOWN_PROBLEMS = 3


class DamagedRowWarning(UserWarning):
    """Rows skipped because a column holds a value the store cannot use."""


@dataclass(frozen=True)
class DamagedRow:
    """One skipped row: where it is and what is wrong with it."""

    table: str
    row_id: Any
    column: str
    problem: str

    def __str__(self) -> str:
        return f"{self.table} row {printable(self.row_id, 40)}, column {self.column}: {self.problem}"


def damage_summary(damaged: Sequence[DamagedRow], where: str) -> str:
    """One line for a list of damaged rows: how many, where, and the first few."""
    listed = "; ".join(map(str, damaged[:_SHOWN_PROBLEMS]))
    more = f" (and {len(damaged) - _SHOWN_PROBLEMS} more)" if len(damaged) > _SHOWN_PROBLEMS else ""
    return (f"flashtune: skipped {len(damaged)} damaged row(s) of database {where}: {listed}{more}; "
            "fix or delete them (re-importing a file or re-tuning the key replaces a damaged winner)")


class _Damage(Exception):
    def __init__(self, column: str, problem: str) -> None:
        super().__init__(problem)
        self.column = column
        self.problem = problem


# --- one-column checks: the raw value to the decoded one, ValueError/TypeError when damaged ------
# Each check is built for its column (NULL allowed or not) and takes the common, valid value on a
# fast path: the dispatcher decodes every winner of an arch at app import.

Check = Callable[[Any], Any]


def number(*, positive: bool, nullable: bool = False) -> Check:
    """A finite number, positive (a time) or else at least zero (a rate, a duration)."""
    low = "positive" if positive else "zero or more"

    def check(value: Any) -> float | None:
        if type(value) is float and (0.0 < value if positive else 0.0 <= value) and value < math.inf:
            return value
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, int) and abs(value) > 2**53):
            raise ValueError(f"not a number: {printable(shown(value))}")
        if not math.isfinite(value) or not (0 < value if positive else 0 <= value):
            raise ValueError(f"must be a finite number, {low}: got {value!r}")
        return float(value)
    return check


def int32(*, nullable: bool = False) -> Check:
    """An int from 0 to 2**31 - 1 (a count, a size, a row id)."""
    def check(value: Any) -> int | None:
        if type(value) is int and 0 <= value <= INT32_MAX:
            return value
        if value is None and nullable:
            return None
        raise ValueError(f"not an int from 0 to {INT32_MAX}: {printable(shown(value))}")
    return check


def label(max_length: int, *, required: bool = False, nullable: bool = False) -> Check:
    """Text that follows the label rule of `db.text`."""
    def check(value: Any) -> str | None:
        if type(value) is str and len(value) <= max_length and value.isprintable() \
                and (not required or value.strip()):
            return value
        if value is None and nullable:
            return None
        problem = label_problem(value, max_length, required=required)
        if problem is not None:
            raise ValueError(f"{problem}: {printable(shown(value))}")
        return value
    return check


def text(*, nullable: bool = False) -> Check:
    """Free text (an error message): any str; escaped wherever it is shown."""
    def check(value: Any) -> str | None:
        if type(value) is str or (value is None and nullable):
            return value
        raise ValueError(f"not text: {printable(shown(value))}")
    return check


def when(*, nullable: bool = False) -> Check:
    """An aware datetime (the column type turned the stored value into one, or could not)."""
    def check(value: Any) -> datetime | None:
        if isinstance(value, datetime):
            return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        if value is None and nullable:
            return None
        raise ValueError(f"not a date: {printable(shown(value))}")
    return check


def outcome(value: Any) -> str:
    """One of the trial outcomes."""
    if value not in OUTCOMES:
        raise ValueError(f"unknown outcome {printable(shown(value))}: expected one of {', '.join(OUTCOMES)}")
    return value


# --- groups of columns -------------------------------------------------------------------------

_KEY_VALUES = attrgetter(*KEY_COLUMNS)


def key_values(key: Key) -> tuple[Any, ...]:
    """A key as its stored column values, in KEY_COLUMNS order (how a row's key is matched)."""
    return _KEY_VALUES(key)


def _key(values: Sequence[Any]) -> Key:
    try:
        key = Key(**dict(zip(KEY_COLUMNS, values)))  # by name: KEY_COLUMNS and Key's fields differ in order
    except InvalidField as exc:
        raise _Damage(exc.field, printable(exc, 200)) from None
    except (TypeError, ValueError) as exc:
        raise _Damage("key", printable(exc, 200)) from None
    # Stored keys are canonical ('sm_90', not 'sm90'): one key, one row, as the unique index says.
    canonical = _KEY_VALUES(key)
    if canonical != tuple(values):
        column, value, wanted = next(c for c in zip(KEY_COLUMNS, values, canonical) if c[1] != c[2])
        raise _Damage(column, f"{printable(shown(value))} is not stored in canonical form ({wanted!r})")
    return key


class _Configs:
    """Config columns to a Config, each distinct raw config parsed and checked once: many rows
    share one, and the dispatcher decodes every winner of an arch at app import."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], Config] = {}

    def __call__(self, values: Sequence[Any]) -> Config:
        raw = tuple(values)
        try:
            return self._seen[raw]
        except KeyError:
            pass
        except TypeError:  # an unhashable raw value: not from a database, but never crash
            raw = ()
        *sizes, extra_text = values
        extra = _extra(extra_text)
        try:
            config = Config(*sizes, extra)
        except InvalidField as exc:
            column = "config_extra" if exc.field == "extra" else exc.field
            raise _Damage(column, printable(exc, 200)) from None
        if raw:
            self._seen[raw] = config
        return config


def _extra(value: Any) -> tuple[tuple[Any, Any], ...]:
    if value in ("", "{}"):
        return ()
    if not isinstance(value, str):
        raise _Damage("config_extra", f"not JSON text: {printable(shown(value))}")
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise _Damage("config_extra", f"not valid JSON ({printable(exc, 80)}): "
                                      f"{printable(shown(value))}") from None
    if not isinstance(parsed, dict):
        raise _Damage("config_extra", f"JSON {type(parsed).__name__}, not an object: "
                                      f"{printable(shown(value))}")
    return tuple(parsed.items())


# --- row specs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSpec:
    """A query's columns after the row id, in order: the key columns (when `key`), the config
    columns (when `config`), then each of `columns` with its check, and an optional `rule`."""

    table: str
    key: bool
    config: bool
    columns: tuple[tuple[str, Check], ...]
    # A check across the decoded columns (by name): (column, problem) for a damaged row, or None.
    rule: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every column the query selects, the id first."""
        return ("id", *(KEY_COLUMNS if self.key else ()), *(CONFIG_COLUMNS if self.config else ()),
                *(name for name, _ in self.columns))


class Decoder:
    """Decodes rows of one spec, skipping damaged ones; `damaged` lists what was skipped."""

    def __init__(self, spec: RowSpec) -> None:
        self.spec = spec
        self.damaged: list[DamagedRow] = []
        self._configs = _Configs()
        nk = len(KEY_COLUMNS) if spec.key else 0
        nc = len(CONFIG_COLUMNS) if spec.config else 0
        self._key_end, self._config_end = 1 + nk, 1 + nk + nc
        self._check_fns = [check for _, check in spec.columns]
        self._names = [name for name, _ in spec.columns]
        self._first_value = 1 + int(spec.key) + int(spec.config)  # in the decoded list

    def values(self, row: Sequence[Any]) -> list[Any] | None:
        """[row id, Key?, Config?, each checked column...], or None for a damaged row (recorded)."""
        try:
            out: list[Any] = [row[0]]
            if self.spec.key:
                out.append(_key(row[1:self._key_end]))
            if self.spec.config:
                out.append(self._configs(row[self._key_end:self._config_end]))
            raw = row[self._config_end:]
            try:
                out += [check(value) for check, value in zip(self._check_fns, raw)]
            except (TypeError, ValueError):
                self._raise_for_column(raw)
            if self.spec.rule is not None:
                broken = self.spec.rule(dict(zip(self._names, out[self._first_value:])))
                if broken is not None:
                    raise _Damage(*broken)
        except _Damage as damage:
            self.damaged.append(DamagedRow(self.spec.table, row[0], damage.column, damage.problem))
            return None
        return out

    def _raise_for_column(self, raw: Sequence[Any]) -> None:
        # The slow path, for a damaged row only: check again, column by column, to name it.
        for (name, check), value in zip(self.spec.columns, raw):
            try:
                check(value)
            except (TypeError, ValueError) as exc:
                raise _Damage(name, str(exc)) from None
        raise _Damage("row", "a column failed its check")  # not reached: the checks are pure

    def decode(self, rows: Iterable[Sequence[Any]], build: Callable[..., Any]) -> list[Any]:
        """`build(*values(row))` for every row that is not damaged."""
        out = []
        for row in rows:
            values = self.values(row)
            if values is not None:
                out.append(build(*values))
        return out
