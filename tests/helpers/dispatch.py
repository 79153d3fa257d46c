"""The dispatcher's tests' shared parts: real databases of winners (`build_db`, `write_winners`), forward keys,
and the fixtures that put the dispatcher's table back (`restore_table`) or load winners for CPU calls
(`tuned_table`). Registered as a pytest plugin in conftest.py."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pytest

from flashtune.db.store import Store
from flashtune.db.types import Config, Key
from flashtune.kernel import dispatch
from flashtune.kernel.version import op_version

from .db import run_info

Entry = tuple[Key, Config, float, str]  # key, config, median ms, kernel version


def build_db(target: Path | str, entries: Iterable[Entry]) -> str:
    """A real database (a SQLite file at a path, or a URL) holding `entries` as winners, written
    through db.store; its URL."""
    url = f"sqlite:///{target}" if isinstance(target, Path) else target
    runs: dict[tuple[str, str], int] = {}
    with Store.open(url, create=True) as store:
        for key, config, median_ms, version in entries:
            if (key.arch, version) not in runs:
                runs[(key.arch, version)] = store.start_run(run_info(arch=key.arch, kernel_version=version))
            trial = store.record_trial(runs[(key.arch, version)], key, config, "ok", median_ms=median_ms)
            assert store.offer_winner(trial, replace=True)
    return url


def key(n: int, *, nk: int | None = None, d: int = 64, dtype: str = "float16", causal: bool = False,
        arch: str = "sm_90", bh: int = 1, group: int = 1) -> Key:
    return Key(arch, "fwd", n, d, dtype, causal, seq_len_kv=nk or n, batch_heads=bh, group=group)


@pytest.fixture
def restore_table() -> Iterator[None]:
    """Put the dispatcher's table back as it was after a test that reloads it."""
    saved = dispatch.table.current
    yield
    dispatch.table.current = saved


RoutedEntry = tuple[Key, Config, "Config | None"]  # key, winning config, kernel config stored beside it


def write_winners(url: str, entries: Sequence[RoutedEntry]) -> None:
    """Store `entries` (key, winning config, kernel config stored beside it) as winners, one run per op."""
    with Store.open(url, create=True) as store:
        runs: dict[str, int] = {}
        for key, config, kernel_config in entries:
            if key.op not in runs:
                runs[key.op] = store.start_run(run_info(arch=key.arch, kernel_version=op_version(key.op)))
            trial = store.record_trial(runs[key.op], key, config, "ok", median_ms=0.01)
            assert store.offer_winner(trial, kernel_config=kernel_config)


@pytest.fixture
def tuned_table(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Write winners to a fresh SQLite file and load them (their keys' archs) for calls, CPU calls
    included unless `interpreter=False`; the dispatcher's table is put back after the test."""
    saved = dispatch.table.current

    def load(entries: Sequence[RoutedEntry], *, interpreter: bool = True) -> str:
        url = f"sqlite:///{tmp_path / 'routing.db'}"
        write_winners(url, entries)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatch.DispatchWarning)  # nothing stale, nothing unreadable
            info = dispatch.reload(url, archs=sorted({key.arch for key, _, _ in entries}), interpreter=interpreter)
        assert info.ok and info.winners == len(entries)
        return url

    yield load
    dispatch.table.current = saved
