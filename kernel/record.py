"""Recording the shapes an app runs: `FLASHTUNE_RECORD=1` counts the keys calls resolve to.

On the hot path this is one dict increment per call (the key is part of the memoised plan). The
counts go to the database's `recorded` table at exit, or on `flush()`; `tune --recorded` then tunes
exactly those keys, the most-called first. Recording never raises into the app: a database that
cannot be written is reported with one warning and the counts are kept for the next flush.
"""
from __future__ import annotations

import atexit
import os
import threading
import warnings
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..db.types import Key

RECORD_ENV_VAR = "FLASHTUNE_RECORD"


def _enabled_from_env() -> bool:
    return os.environ.get(RECORD_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


ENABLED: bool = _enabled_from_env()
_counts: dict["Key", int] = {}
_lock = threading.Lock()


def hit(key: "Key") -> None:
    """Count one call that resolved to `key` (the dispatcher calls this only while ENABLED)."""
    # dict.get + store is not atomic across threads, but a lost count among thousands does not
    # change which keys are worth tuning; a lock here would cost every call.
    _counts[key] = _counts.get(key, 0) + 1


def pending() -> dict["Key", int]:
    """The counts not yet written, as a copy."""
    with _lock:
        return dict(_counts)


def flush(url: str | None = None) -> int:
    """Write the pending counts to the database at `url` (default: FLASHTUNE_DB or the user file) and
    forget them; returns how many keys were written. The store writes them in short batches (a
    tuner beside the app waits for one batch at most). Never raises: a failure warns once and keeps
    the counts of the batches not written."""
    with _lock:
        counts = dict(_counts)
        _counts.clear()
    if not counts:
        return 0
    unwritten = dict(counts)

    def written(keys: Sequence["Key"]) -> None:
        for key in keys:
            del unwritten[key]

    try:
        from ..db.store import Store

        with Store.open(url) as store:
            store.add_recorded(counts, written)
    except Exception as exc:  # noqa: BLE001 - recording must never break the app
        with _lock:
            for key, n in unwritten.items():
                _counts[key] = _counts.get(key, 0) + n
        warnings.warn(f"flashtune: could not write {len(unwritten)} recorded shape(s): "
                      f"{type(exc).__name__}: {' '.join(str(exc).split())}", RuntimeWarning, stacklevel=2)
        return len(counts) - len(unwritten)
    return len(counts)


def _flush_at_exit() -> None:
    if ENABLED:
        flush()


atexit.register(_flush_at_exit)
