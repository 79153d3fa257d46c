"""The dispatcher's table: the winners of the visible GPUs' archs, read from the database once at import (and at
`reload()`), the bundled winners of the visible GPUs' models under them (db.bundled), with FLASHTUNE_CONFIG; and
the state the plans share (memos, warnings given, failed configs).

Loading never raises: a missing, locked, corrupt or newer-schema database warns once and leaves the bundled
winners and the defaults (or the table loaded before); an unreadable bundled file warns once and is left out.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ...db import bundled as _bundled
from ...db.errors import first_line, one_line
from ...db.text import printable, shown
from ...db.types import Config, Key

from ..device import device_arch, device_name, device_sm_count
from ..ops.fwd import fwd_variant
from ..version import OP_VERSIONS
from .rules import CONFIG_ENV_VAR, EMPTY, Entry, GroupKey, Layer, group_key

if TYPE_CHECKING:  # the store needs sqlalchemy; it is imported only when the database is read
    from ...db.store import Winner

log = logging.getLogger("flashtune.dispatch")

DB_ENV_VAR = "FLASHTUNE_DB"  # db.paths.ENV_VAR; repeated so that a missing sqlalchemy cannot break import
MEMO_LIMIT = 4096  # distinct call signatures kept; apps with ever-changing lengths just re-resolve
# FLASHTUNE_CONFIG is read at import, which must never fail: longer or more bracketed text is refused
# before parsing (a deeply nested JSON extra would raise RecursionError in the parser). A real
# override has one {...} of scalar knobs.
_OVERRIDE_MAX_CHARS = 1000
_OVERRIDE_MAX_BRACKETS = 16


class DispatchWarning(UserWarning):
    """Why the dispatcher is not using what the database holds (unreadable, stale, failing)."""


@dataclass(frozen=True)
class LoadInfo:
    """What the last load (import or `reload()`) read, for `flashtune doctor` and people."""

    url: str | None  # masked; None when no database was read
    archs: tuple[str, ...]
    winners: int
    ok: bool  # False when the database could not be read and warned about
    message: str
    override: Config | None = None
    bundled: int = 0  # bundled winners loaded under the database's (db.bundled)
    bundled_message: str = ""  # how many bundled winners apply, skipped ones, unreadable files
    bundled_left_out: int = 0  # bundled winners skipped (stale) plus bundled files unreadable


@dataclass
class Table:
    """One loaded snapshot (rules.Tables and what the plans keep). Replaced whole by reload(), so a reader
    never sees half a table."""

    exact: dict[Key, "Winner"]
    groups: dict[GroupKey, tuple[Entry, ...]]
    override: Config | None
    info: LoadInfo
    url: str | None = None  # what reload() was given (None: FLASHTUNE_DB or the default file)
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # plans per call signature
    choices: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # the backward's choices (bwd_choice)
    interpreter: bool = False  # CPU tensors take the rules from INTERPRETER_ARCH's entries (reload)
    bundled: Layer = EMPTY  # the bundled winners of the visible GPUs' models, consulted after the user's
    skipped: dict[Key, str] = field(default_factory=dict)  # bundled winners not used (stale), and why
    gpus: tuple[_bundled.GpuModel, ...] | None = None  # what reload() was given (None: the visible GPUs)


def build_layer(winners: Iterable["Winner"]) -> Layer:
    """`winners` by exact key and grouped for the nearest rule."""
    exact: dict[Key, Winner] = {}
    groups: dict[GroupKey, list[Entry]] = {}
    for w in winners:
        k = w.key
        exact[k] = w
        groups.setdefault(group_key(k), []).append(
            (k.seq_len, k.seq_len_kv, k.batch_heads, k.group, w))
    return Layer(exact, {g: tuple(sorted(v, key=lambda e: e[:4])) for g, v in groups.items()})


def build_table(winners: Iterable["Winner"], override: Config | None, info: LoadInfo,
                bundled: Layer = EMPTY, skipped: dict[Key, str] | None = None) -> Table:
    """A table of the user's `winners` over the `bundled` layer."""
    layer = build_layer(winners)
    return Table(dict(layer.exact), dict(layer.groups), override, info, bundled=bundled, skipped=skipped or {})


def visible_archs() -> tuple[str, ...]:
    """Archs of the CUDA devices this process sees, sorted; () without CUDA."""
    if not torch.cuda.is_available():
        return ()
    return tuple(sorted({device_arch(i) for i in range(torch.cuda.device_count())}))


def visible_gpus() -> tuple[_bundled.GpuModel, ...]:
    """The CUDA devices this process sees, as the bundled layer matches them (name, arch, SM count)."""
    if not torch.cuda.is_available():
        return ()
    return tuple(_bundled.GpuModel(device_name(i), device_arch(i), device_sm_count(i))
                 for i in range(torch.cuda.device_count()))


def _read_bundled(gpus: tuple[_bundled.GpuModel, ...]) -> tuple[Layer, dict[Key, str], _bundled.Selection | None]:
    """The bundled layer for `gpus` and the keys whose bundled winner is stale; warns (never raises) for an
    unreadable file or FLASHTUNE_BUNDLED's value."""
    how, problem = _bundled.mode()
    if problem:
        warnings.warn(problem, DispatchWarning, stacklevel=4)
    try:
        selection = _bundled.select(gpus, OP_VERSIONS, how=how)
    except Exception as exc:  # noqa: BLE001 - import must never fail for a shipped file
        warnings.warn(f"flashtune: cannot read the bundled winners ({type(exc).__name__}: {exc}); "
                      "the database's winners and the defaults apply", DispatchWarning, stacklevel=4)
        return EMPTY, {}, None
    for text in selection.problems:
        warnings.warn(f"flashtune: ignoring a bundled file: {printable(text, 400)}", DispatchWarning, stacklevel=4)
    skipped = {s.winner.key: s.reason for s in selection.skipped}
    return build_layer(selection.winners), skipped, selection


def _read_override() -> tuple[Config | None, str | None]:
    """FLASHTUNE_CONFIG as a config the kernel can run, or why it is ignored; never raises."""
    text = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if not text:
        return None, None
    brackets = text.count("{") + text.count("[")
    if len(text) > _OVERRIDE_MAX_CHARS:
        problem = f"longer than {_OVERRIDE_MAX_CHARS} characters"
    elif brackets > _OVERRIDE_MAX_BRACKETS:
        problem = f"{brackets} brackets ('{{' or '['): extra knobs are scalars in one JSON object"
    else:
        try:
            config = Config.parse(text)
            fwd_variant(config)  # a knob the kernel does not know is refused here, not at every call
            return config, None
        except (ValueError, TypeError) as exc:
            problem = one_line(exc)
        except Exception as exc:  # noqa: BLE001 - import must never fail, whatever the parser raises
            problem = first_line(exc)
    return None, f"flashtune: ignoring {CONFIG_ENV_VAR}={shown(text, 120)}: {printable(problem, 300)}"


def _read_winners(url: str | None, archs: tuple[str, ...]) -> tuple[list["Winner"] | None, LoadInfo]:
    """The winners of `archs` (None when the database could not be read) and what happened."""
    if not archs:
        return [], LoadInfo(None, archs, 0, True, "no CUDA GPU visible: nothing loaded, defaults apply")
    where: str | None = None  # the masked URL, once known: a password never reaches a message
    try:
        from ...db.paths import default_sqlite_path, default_url
        from ...db.text import mask_url
        from ...db.store import StoreError, load_winners

        if url is None and not os.environ.get(DB_ENV_VAR, "").strip():
            path = default_sqlite_path()
            if not path.exists():
                # A fresh machine: nothing tuned yet is the normal state, not worth a warning.
                return [], LoadInfo(str(path), archs, 0, True,
                                    f"no database at {path} (nothing tuned yet): defaults apply")
        url = default_url() if url is None else url
        where = mask_url(url)
        winners = load_winners(archs, url)
    except StoreError as exc:
        return None, LoadInfo(where, archs, 0, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - import must never fail: any other cause is reported too
        return None, LoadInfo(where, archs, 0, False, f"reading the database{' ' + where if where else ''} "
                              f"failed: {type(exc).__name__}: {exc}")
    return winners, LoadInfo(where, archs, len(winners), True,
                             f"{len(winners)} tuned config(s) for {', '.join(archs)} from {where}")


def _load(url: str | None, archs: Iterable[str] | None, previous: Table | None,
          gpus: Iterable[_bundled.GpuModel] | None = None) -> Table:
    """Read the database, the bundled winners and the override into a new table; warn (never raise) on failure.
    `gpus`: the GPUs whose models the bundled layer matches (None: the visible ones)."""
    override, override_problem = _read_override()
    if override_problem:
        warnings.warn(override_problem, DispatchWarning, stacklevel=3)
    given = None if gpus is None else tuple(gpus)
    try:
        models = visible_gpus() if given is None else given
        if archs is not None:
            arch_list = tuple(sorted({str(a) for a in archs}))
        elif given is not None:
            arch_list = tuple(sorted({g.arch for g in given}))
        else:
            arch_list = visible_archs()
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break `import kernel`
        warnings.warn(f"flashtune: cannot query the CUDA devices ({type(exc).__name__}: {exc}); "
                      "default configs will be used", DispatchWarning, stacklevel=3)
        arch_list, models = (), ()
    bundled, skipped, selection = _read_bundled(tuple(g for g in models if g.arch in arch_list))
    winners, info = _read_winners(url, arch_list)
    if winners is None:
        kept = list(previous.exact.values()) if previous is not None else []
        tail = (f"keeping the {len(kept)} config(s) loaded before" if kept
                else "default configs will be used")
        warnings.warn(f"flashtune: cannot load tuned configs: {info.message}; {tail}",
                      DispatchWarning, stacklevel=3)
        info = LoadInfo(info.url, info.archs, len(kept), False, f"{info.message}; {tail}")
        winners = kept
    else:
        log.info("flashtune: %s", info.message)
    info = LoadInfo(info.url, info.archs, info.winners, info.ok, info.message, override, len(bundled.exact),
                    selection.message if selection is not None else "bundled winners unreadable",
                    len(selection.skipped) + len(selection.problems) if selection is not None else 1)
    table = build_table(winners, override, info, bundled, skipped)
    table.url, table.gpus = url, given
    return table


lock = threading.Lock()
warned: set[Any] = set()  # the warnings given, once each
# (op, arch, smem, config, D, dtype, causal) -> the error a stored config failed to compile with here
failed: dict[tuple[str, str, int, Config, int, str, bool], str] = {}
current: Table = _load(None, None, None)


def reload(url: str | None = None, archs: Iterable[str] | None = None, *, interpreter: bool = False,
           gpus: Iterable[_bundled.GpuModel] | None = None) -> LoadInfo:
    """Re-read the database (default: `db.paths.default_url()` now), the bundled winners and FLASHTUNE_CONFIG.

    `archs` defaults to the visible GPUs' archs (or `gpus`' archs); pass some to load others (planning,
    tests). An unreadable database warns and keeps the configs loaded before; this never raises for it.
    `interpreter=True`: CPU tensors (the Triton interpreter) are resolved from the loaded
    `INTERPRETER_ARCH` entries by the same rules as a GPU's calls, instead of getting the default.
    `gpus` (db.bundled.GpuModel: name, arch, SM count) stands for the visible GPUs when the bundled layer
    matches models (planning for a GPU that is not here, tests).
    """
    global current
    new = _load(url, archs, current, gpus)
    new.interpreter = bool(interpreter)
    with lock:
        current = new
    return new.info


def info() -> LoadInfo:
    """What the current table was loaded from."""
    return current.info


def table_for(arch: str) -> Table:
    """The loaded table when it covers `arch`; else that arch's winners read now, for planning calls
    (`explain(arch=...)`, `lookup`) about a GPU that is not here. Never on the hot path, and the
    runtime table is left as it is."""
    table = current
    if arch in table.info.archs:
        return table
    return _load(table.url, (arch,), None, table.gpus)
