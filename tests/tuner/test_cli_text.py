"""What the CLI prints from the user's own arguments and from warnings: escaped, one line each.

An argument can hold an escape sequence (ESC, an OSC that retitles the terminal), a newline that forges
a line, or a bidi override that reorders what follows; none of them may reach the terminal raw. The runs
pass `color=True`: output as on a terminal, where click keeps colour codes (it strips them only when piped).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashtune.db.store import Store
from flashtune.tuner.cli import main

from helpers.db import execute_raw, populate
from helpers.subproc import repo_env

HOSTILE = {"csi": "\x1b[31m", "osc": "\x1b]0;pwned\x07", "newline": "a\nforged", "bidi": "\u202eevil"}
RAW = ("\x1b", "\x07", "\u202e")


def _clean(output: str, lines: int) -> None:
    for raw in RAW:
        assert raw not in output, output
    assert len(output.strip().splitlines()) == lines, output


@pytest.fixture(params=list(HOSTILE))
def hostile(request: pytest.FixtureRequest) -> str:
    """Each hostile text in turn (or the one a test names)."""
    return HOSTILE[request.param]


def test_db_path_escapes_its_argument(tmp_path: Path, hostile: str) -> None:
    result = CliRunner().invoke(main, color=True, args=["db", "path", "--db", f"sqlite:///{tmp_path}/x{hostile}.db"])
    assert result.exit_code == 0, result.output
    _clean(result.stdout, 1)


def test_export_names_its_output_escaped(tmp_path: Path, sqlite_url: str, hostile: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    target = tmp_path / f"out{hostile}.json"
    result = CliRunner().invoke(main, color=True, args=["export", "--db", sqlite_url, "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.exists() and "exported 12 winner(s) to" in result.stderr
    _clean(result.stderr, 1)


@pytest.mark.parametrize("hostile", ["csi", "osc", "bidi"], indirect=True)  # a newline: folded, as ever
def test_plot_kernel_version_is_escaped_in_its_error(tmp_path: Path, sqlite_url: str, hostile: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    args = ["plot", "--heatmap", "--arch", "sm_90", "--seq", "1024", "--head-dim", "64", "--dtype", "fp16", "--causal",
            "--kernel-version", f"v{hostile}", "--db", sqlite_url, "--out", str(tmp_path)]
    result = CliRunner().invoke(main, color=True, args=args)
    assert result.exit_code == 2 and "with kernel version v" in result.stderr
    _clean(result.stderr, 1)


def test_a_damaged_row_warning_is_one_line_on_stderr(sqlite_url: str) -> None:
    with Store.open(sqlite_url) as store:
        populate(store)
    execute_raw(sqlite_url, "UPDATE flashtune_winners SET gpu_name = 'x' || char(27) || ']0;t' WHERE seq_len = 128")
    # The real console script, in a fresh process: Python's own warning format, not pytest's capture.
    flashtune = Path(sys.executable).with_name("flashtune")
    done = subprocess.run([str(flashtune), "show", "--db", sqlite_url], capture_output=True, text=True,
                          env=repo_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("flashtune: skipped 4 damaged row(s)"), done.stderr
    _clean(done.stderr, 1)
