"""The dispatcher's database read: real SQLite files, good and broken; `build_db` for the other
dispatcher tests (imported by test_dispatch.py and test_dispatch_gpu.py)."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel import dispatch
from flashtune.kernel.version import op_version
from helpers.dispatch import build_db, key
from helpers.subproc import repo_env

FWD_VERSION = op_version("fwd")

REPO = Path(__file__).resolve().parents[2]









@pytest.fixture
def good_db(tmp_path: Path) -> str:
    return build_db(tmp_path / "good.db", [(key(1024), Config(128, 64, 8, 3), 0.5, FWD_VERSION),
                                           (key(512, arch="sm_80"), Config(64, 64, 4, 2), 0.3, FWD_VERSION)])


def _reload_warnings(url: str) -> tuple[dispatch.LoadInfo, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = dispatch.reload(url, archs=["sm_90"])
    return info, [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]


def test_reload_loads_only_the_requested_archs(good_db: str, restore_table: None) -> None:
    info = dispatch.reload(good_db, archs=["sm_90"])
    assert info.ok and info.winners == 1 and info.archs == ("sm_90",)
    assert dispatch.lookup("sm_90", 1024, 64, "float16", False).source == "exact"
    # An arch that was not loaded (no such GPU here) is read on demand for planning questions, from
    # the same database, and the runtime table stays as it was.
    planned = dispatch.lookup("sm_80", 512, 64, "float16", False)
    assert planned.source == "exact" and planned.config == Config(64, 64, 4, 2)
    assert dispatch.info().archs == ("sm_90",) and dispatch.info().winners == 1
    info = dispatch.reload(good_db, archs=["sm_80", "sm_90"])
    assert info.winners == 2
    assert dispatch.lookup("sm_80", 512, 64, "float16", False).config == Config(64, 64, 4, 2)


def test_reload_reads_each_backend(db_url: str, restore_table: None) -> None:
    build_db(db_url, [(key(1024), Config(128, 64, 8, 3), 0.5, FWD_VERSION),
                      (key(128, nk=4096, causal=True), Config(64, 32, 4, 2), 0.2, "0123456789ab")])
    info = dispatch.reload(db_url, archs=["sm_90"])
    assert info.ok and info.winners == 2
    assert dispatch.lookup("sm_90", 1024, 64, "float16", False).config == Config(128, 64, 8, 3)
    cross = dispatch.lookup("sm_90", 128, 64, "float16", True, seq_len_kv=4096)
    assert cross.source == "exact" and cross.stale and cross.winner is not None
    assert cross.winner.key == key(128, nk=4096, causal=True)


def test_corrupt_file_warns_once_and_keeps_what_was_loaded(tmp_path: Path, good_db: str,
                                                           restore_table: None) -> None:
    dispatch.reload(good_db, archs=["sm_90"])
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database at all" * 100)
    info, messages = _reload_warnings(f"sqlite:///{bad}")
    assert len(messages) == 1 and "corrupt" in messages[0] and str(bad) in messages[0]
    assert not info.ok and info.winners == 1
    assert dispatch.lookup("sm_90", 1024, 64, "float16", False).source == "exact"


def test_truncated_sqlite_file_warns(tmp_path: Path, good_db: str, restore_table: None) -> None:
    path = Path(good_db.removeprefix("sqlite:///"))
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(path.read_bytes()[:1500])  # a valid header, the pages cut off
    dispatch.table.current = dispatch.table.build_table([], None, dispatch.info())
    info, messages = _reload_warnings(f"sqlite:///{truncated}")
    assert len(messages) == 1 and not info.ok and info.winners == 0
    assert dispatch.lookup("sm_90", 1024, 64, "float16", False).source == "default"


def test_missing_file_named_explicitly_warns_and_is_not_created(tmp_path: Path, restore_table: None) -> None:
    missing = tmp_path / "nowhere" / "flashtune.db"
    info, messages = _reload_warnings(f"sqlite:///{missing}")
    assert len(messages) == 1 and str(missing) in messages[0]
    assert not info.ok and not missing.exists() and not missing.parent.exists()


def test_missing_default_file_is_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       restore_table: None) -> None:
    # The per-user default file not existing yet is the normal state of a fresh machine.
    monkeypatch.delenv("FLASHTUNE_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = dispatch.reload(archs=["sm_90"])
    assert info.ok and info.winners == 0 and "nothing tuned yet" in info.message
    assert not (tmp_path / "xdg").exists()


def test_newer_schema_warns(tmp_path: Path, good_db: str, restore_table: None) -> None:
    path = Path(good_db.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE flashtune_meta SET value = '99' WHERE name = 'schema_version'")
    info, messages = _reload_warnings(good_db)
    assert len(messages) == 1 and "schema version 99" in messages[0]
    assert not info.ok


def test_locked_database_warns(good_db: str, restore_table: None) -> None:
    path = Path(good_db.removeprefix("sqlite:///"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        # Exclusive locking mode keeps even WAL readers out until the holder lets go.
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE flashtune_meta SET value = value")
        info, messages = _reload_warnings(good_db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(messages) == 1 and "locked" in messages[0] and not info.ok


def _import_kernel(env_db: str, code: str = "") -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent("""
        import os, warnings
        warnings.simplefilter("always")
        import flashtune.kernel
        from flashtune.kernel import attention, dispatch
        print("IMPORTED", dispatch.info().ok)
    """) + textwrap.dedent(code)
    # No GPU: the child runs on the CPU under the interpreter.
    env = repo_env(FLASHTUNE_DB=env_db, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    env.pop("FLASHTUNE_CONFIG", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs its child on the CPU interpreter, which fails under "
                    "Triton 3.6 with numpy 2.5 (the GPU machine); there test_dispatch_gpu imports against a corrupt file")
@pytest.mark.parametrize("which", ["corrupt", "missing"])
def test_import_kernel_survives_a_bad_database(tmp_path: Path, which: str) -> None:
    path = tmp_path / f"{which}.db"
    if which == "corrupt":
        path.write_bytes(b"\x00garbage" * 512)
    # No GPU is visible in the child, so the import itself reads nothing; the reload that follows
    # runs the same loading code against the bad file for sm_90.
    result = _import_kernel(f"sqlite:///{path}", """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = dispatch.reload(archs=["sm_90"])
        print("RELOADED", info.ok, len(caught))
        import torch
        q = torch.randn(1, 1, 16, 16)
        print("RAN", bool(torch.isfinite(attention(q, q, q)).all()))
    """)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED True" in result.stdout
    assert "RELOADED False 1" in result.stdout and "RAN True" in result.stdout
    assert path.exists() == (which == "corrupt")  # the missing file was not created


def test_unreachable_server_warns_without_the_password(restore_table: None) -> None:
    info, messages = _reload_warnings("postgresql+psycopg://flashtune:s3cret@127.0.0.1:1/flashtune")
    assert len(messages) == 1 and "127.0.0.1:1" in messages[0]
    assert "s3cret" not in messages[0] and "s3cret" not in info.message and not info.ok


def test_import_kernel_survives_a_deeply_nested_override(tmp_path: Path) -> None:
    # FLASHTUNE_CONFIG with a deeply nested extra once made `import flashtune.kernel` raise RecursionError.
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from flashtune.kernel import dispatch
        print("IMPORTED", dispatch.info().override, len(caught), str(caught[0].message)[:400])
    """)
    text = 'm64-n32-w4-s2+{"a":' + "[" * 50_000 + "]" * 50_000 + "}"
    env = repo_env(FLASHTUNE_DB=f"sqlite:///{tmp_path / 'none.db'}", CUDA_VISIBLE_DEVICES="",
                   FLASHTUNE_CONFIG=text)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED None 1 flashtune: ignoring FLASHTUNE_CONFIG=" in result.stdout
    assert "longer than 1000 characters" in result.stdout


def test_hand_edited_winner_time_does_not_break_lookup(good_db: str, restore_table: None) -> None:
    # median_ms='fast' in a row once made lookup raise "Unknown format code 'g'". The store may skip
    # the damaged row (then the default applies) or pass it on; either way lookup answers.
    path = Path(good_db.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("UPDATE flashtune_winners SET median_ms = 'fast' WHERE arch = 'sm_90'").rowcount == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatch.reload(good_db, archs=["sm_90"])
    choice = dispatch.lookup("sm_90", 1024, 64, "float16", False)
    assert choice.source in ("default", "exact")
    assert choice.source == "default" or "unreadable time 'fast'" in choice.reason
    assert str(choice)
