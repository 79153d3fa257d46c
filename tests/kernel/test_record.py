"""FLASHTUNE_RECORD=1: an app's calls are counted by key and written at exit; `show --recorded` lists them.

The app runs in a subprocess under the Triton interpreter (CPU tensors resolve to the nominal arch),
against a real SQLite file and the real PostgreSQL server.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.tuner.cli import main as cli

from helpers.subproc import repo_env

APP = """
import torch
from flashtune.kernel import attention, record
q = torch.randn(2, 4, 24, 16); kv = torch.randn(2, 2, 24, 16)
with torch.no_grad():
    for _ in range(5):
        attention(q, kv, kv, is_causal=True, enable_gqa=True)
    for _ in range(2):
        attention(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32))
print(record.ENABLED, len(record.pending()))
"""


def _run_app(url: str, record: str = "1") -> subprocess.CompletedProcess[str]:
    env = repo_env(TRITON_INTERPRET="1", FLASHTUNE_DB=url, FLASHTUNE_RECORD=record)
    return subprocess.run([sys.executable, "-c", APP], env=env, capture_output=True, text=True, timeout=300)


def test_calls_are_counted_by_key_and_written_at_exit(db_url: str) -> None:
    Store.open(db_url).close()
    for _ in range(2):  # two runs of the app: the counts add up
        done = _run_app(db_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "2"]
    gqa = Key(INTERPRETER_ARCH, "fwd", 24, 16, "float32", True, batch_heads=8, group=2)
    plain = Key(INTERPRETER_ARCH, "fwd", 40, 32, "float32", False, batch_heads=2, group=1)
    with Store.open(db_url, create=False) as store:
        assert [(r.key, r.calls) for r in store.recorded()] == [(gqa, 10), (plain, 4)]
    shown = CliRunner().invoke(cli, ["show", "--recorded", "--json", "--db", db_url])
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.stdout)
    assert [(r["seq_len"], r["batch_heads"], r["group"], r["calls"]) for r in rows] == [(24, 8, 2, 10), (40, 2, 1, 4)]
    table = CliRunner().invoke(cli, ["show", "--recorded", "--db", db_url])
    assert table.exit_code == 0 and "2 recorded key(s)" in table.stdout


def test_recording_off_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'off.db'}"
    Store.open(url).close()
    done = _run_app(url, record="0")
    assert done.returncode == 0 and done.stdout.split() == ["False", "0"], done.stderr
    with Store.open(url, create=False) as store:
        assert store.recorded() == []


def test_an_unwritable_database_warns_and_keeps_the_counts(tmp_path: Path) -> None:
    code = """
import warnings, torch
from flashtune.kernel import attention, record
with torch.no_grad():
    attention(torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    written = record.flush("sqlite:///%s/not-a-dir/x.db")
print(written, len(record.pending()), any("could not write 1 recorded" in str(w.message) for w in caught))
""" % (tmp_path / "file")
    (tmp_path / "file").write_text("a regular file where a directory should be")
    env = repo_env(TRITON_INTERPRET="1", FLASHTUNE_RECORD="1", FLASHTUNE_DB=f"sqlite:///{tmp_path / 'f.db'}")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:3] == ["0", "1", "True"]
