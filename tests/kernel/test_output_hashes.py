"""Every kernel's output on fixed inputs is bitwise what it was: a refactor that moves or shares code
must not change what the kernels compute.

`tests/fixtures/output_hashes_interpreter.json` holds the fingerprints (bench/output_hashes.py) of every op
and variant under the Triton interpreter. A change that is meant to change a kernel's results regenerates
the file with the command in bench/output_hashes.py's docstring (the CPU's vector code pinned) and says why in
its commit.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.subproc import repo_env

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "output_hashes_interpreter.json"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fixture holds the interpreter's outputs")


def _script():
    spec = importlib.util.spec_from_file_location("output_hashes", REPO / "bench" / "output_hashes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kernel_output_is_bitwise_unchanged(tmp_path: Path) -> None:
    script = _script()
    expected = json.loads(FIXTURE.read_text())
    # A fresh process with the CPU's vector code pinned (the script's PORTABLE_CPU_ENV): the fixture then
    # holds on any x86-64 CPU, not only on the one that wrote it.
    out = tmp_path / "hashes.json"
    env = repo_env(TRITON_INTERPRET="1", **script.PORTABLE_CPU_ENV)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "output_hashes.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert {op.split("/")[0] for op in got} == {"fwd", "bwd", "kvcache"}
    assert not [v for v in got.values() if v.startswith("error")]
    assert script.compare(expected, got) == []
