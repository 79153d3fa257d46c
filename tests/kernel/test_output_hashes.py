"""Every kernel's output on fixed inputs is bitwise what it was: a refactor that moves or shares code
must not change what the kernels compute.

`tests/fixtures/output_hashes_interpreter.json` holds the fingerprints (bench/output_hashes.py) of every op
and variant under the Triton interpreter. A change that is meant to change a kernel's results regenerates
the file with `TRITON_INTERPRET=1 python bench/output_hashes.py --out tests/fixtures/output_hashes_interpreter.json`
and says why in its commit.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "output_hashes_interpreter.json"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fixture holds the interpreter's outputs")


def _script():
    spec = importlib.util.spec_from_file_location("output_hashes", REPO / "bench" / "output_hashes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kernel_output_is_bitwise_unchanged() -> None:
    script = _script()
    expected = json.loads(FIXTURE.read_text())
    got = script.fingerprints("cpu")
    assert {op.split("/")[0] for op in got} == {"fwd", "bwd", "kvcache"}
    assert not [v for v in got.values() if v.startswith("error")]
    assert script.compare(expected, got) == []
