"""The console scripts `flashtune` and `tune` themselves, as `pip install` puts them on PATH.

The other CLI tests call the click commands in-process; these run the installed entry points in a
fresh process, so a broken `[project.scripts]` entry, a wrong program name in the usage line or a
traceback on bad input shows up here.
"""
from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

from flashtune.db.store import Store

from helpers.db import CFG_B, populate
from helpers.subproc import repo_env

SCRIPTS = Path(sysconfig.get_path("scripts"))


def script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = SCRIPTS / name
    assert path.exists(), f"{path} is missing: install the project (pip install -e '.[test]')"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120,
                          env=env or repo_env())


def test_tune_help_and_version_name_tune_itself():
    helped = script("tune", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.splitlines()[0] == "Usage: tune [OPTIONS]"
    for option in ("--seq", "--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json"):
        assert re.search(rf"^\s+{option}\b", helped.stdout, re.M), option
    version = script("tune", "--version")
    assert version.returncode == 0 and version.stdout.startswith("tune, version ")
    assert script("flashtune", "--version").stdout.startswith("flashtune, version ")


def test_tune_bad_input_is_one_line_without_a_traceback():
    done = script("tune", "--dry-run", "--arch", "sm_90", "--seq", str(2**40))
    assert done.returncode == 2
    assert done.stderr == f"Error: --seq: sequence length '{2**40}' is above the limit of 2147483647 (2**31 - 1)\n"


def test_flashtune_show_reads_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    with Store.open(url) as store:
        populate(store)
    done = script("flashtune", "show", "--db", url, "--head-dim", "128", "--causal")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"3 winner(s) in {url}"
    assert lines[1].split()[:6] == ["arch", "op", "N", "D", "dtype", "causal"]
    assert len([ln for ln in lines if ln.startswith("sm_90") and str(CFG_B) in ln]) == 3


@pytest.mark.parametrize("args, message", [
    (["show", "--head-dim", str(10**30)], "Error: --head-dim: unsupported head dim '1" + "0" * 23 + "...'"),
    (["show", "--head-dim", "100"], "Error: --head-dim: unsupported head dim 100"),
    (["plot", "--heatmap", "--seq", str(2**70)], f"Error: --seq: sequence length '{2**70}' is above the limit"),
])
def test_flashtune_bad_numbers_are_one_line_exit_2(tmp_path, args, message):
    done = script("flashtune", *args, "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(message), line
