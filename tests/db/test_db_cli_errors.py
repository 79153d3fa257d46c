"""Hostile database inputs through the commands and the dispatcher: exit code 2 and one line (doctor:
a [FAIL] line), nothing hangs, nothing is written, and `dispatch.reload` falls back with one warning.

The commands are the real `flashtune` group (CliRunner); the database layer underneath is what
these tests are about (tests/db/test_db_cli.py covers the commands' normal output).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from flashtune.db.store import Store

from helpers.db import execute_raw, finishes_within, populate, raw_snapshot, winners_document
from helpers.cli import assert_usage_error

BAD_URLS = ["not a url", "mysql://u:s3cret@h/d", "http://example.com/x.db", "postgresql+foo://u:s3cret@h/d",
            "sqlite:///~nosuchuser-flashtune/x.db", f"sqlite:////tmp/{'a' * 5000}.db",
            "postgresql+psycopg://u:s3cret@h:5x/d", "sqlite+pysqlcipher://:s3cret@/x.db", "sqlite://",
            "sqlite:///:memory:"]


def flashtune(*args: str, env: dict[str, str] | None = None) -> Result:
    from flashtune.tuner.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert_usage_error(result, *needles)  # exit code 2, one line on stderr
    assert "Traceback" not in result.output and "s3cret" not in result.output


@pytest.fixture
def exchange_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(winners_document(3, first=8)))  # N = 128 is one of populate's keys
    return path


@pytest.mark.parametrize("url", BAD_URLS)
def test_unusable_urls_exit_2_with_one_line(url: str, exchange_file: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (["show", "--db", url], ["db", "path", "--db", url], ["import", exchange_file, "--db", url],
                 ["import", exchange_file, "--dry-run", "--db", url], ["export", "--db", url]):
        assert_one_line_error(flashtune(*args), "database URL")
        assert_one_line_error(flashtune(*args[:-2], env={"FLASHTUNE_DB": url}), "database URL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]


def test_in_memory_import_is_refused_not_lost(exchange_file: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"):
        assert_one_line_error(flashtune("import", exchange_file, "--db", url), "would vanish")


def test_a_fifo_is_refused_at_once(fifo: Path, exchange_file: Path, sqlite_url: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    before = raw_snapshot(sqlite_url)
    for args in (["show", "--db", f"sqlite:///{fifo}"], ["db", "vacuum", "--db", f"sqlite:///{fifo}"],
                 ["import", fifo, "--db", sqlite_url], ["import", fifo, "--dry-run", "--db", sqlite_url],
                 ["import", "/dev/zero", "--db", sqlite_url]):
        result = finishes_within(20, lambda: flashtune(*args), unblock=fifo)
        assert_one_line_error(result, "not a regular file")
    assert raw_snapshot(sqlite_url) == before


def test_doctor_fails_with_one_line_on_a_bad_url(tmp_path: Path) -> None:
    for url in ("mysql://u:s3cret@h/d", "sqlite://"):
        result = flashtune("doctor", "--db", url, "--no-run")
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and "s3cret" not in result.output
        fails = [line for line in result.output.splitlines() if "FAIL" in line and "database" in line]
        assert len(fails) == 1 and "database URL" in fails[0], result.output


def test_damaged_rows_never_crash_a_command(sqlite_url: str, exchange_file: Path) -> None:
    from flashtune.db.rows import DamagedRowWarning

    with Store.open(sqlite_url) as store:
        populate(store)
    execute_raw(sqlite_url, "UPDATE flashtune_winners SET config_extra = '[]' WHERE seq_len = 128")
    execute_raw(sqlite_url, "UPDATE flashtune_winners SET measured_at = 'yesterday' WHERE seq_len = 512")
    execute_raw(sqlite_url, "UPDATE flashtune_winners SET median_ms = 'fast' WHERE seq_len = 2048")
    before = raw_snapshot(sqlite_url)
    for args in (["show"], ["show", "--json"], ["export"], ["import", exchange_file, "--dry-run"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = flashtune(*args, "--db", sqlite_url)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        assert not [w for w in caught if issubclass(w.category, DamagedRowWarning)]  # the CLI printed it:
        (damage,) = result.stderr.strip().splitlines()  # one line on stderr
        assert "damaged row(s)" in damage and "column config_extra" in damage
    assert raw_snapshot(sqlite_url) == before


def test_dispatcher_reload_falls_back_with_one_warning(fifo: Path, tmp_path: Path) -> None:
    from flashtune.kernel import dispatch

    for url in (f"sqlite:///{fifo}", "mysql://u:s3cret@h/d", "sqlite://", f"sqlite:///{tmp_path}"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = finishes_within(20, lambda: dispatch.reload(url, archs=["sm_90"]), unblock=fifo)
        messages = [str(w.message) for w in caught]
        assert not info.ok and len(messages) == 1, messages
        assert "\n" not in messages[0] and "s3cret" not in messages[0]
    dispatch.reload()
