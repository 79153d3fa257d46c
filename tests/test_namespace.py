"""flashtune installs as one `flashtune` package: nothing called `kernel`, `db` or `tuner` at the top level.

An app's own `db.py`, `db/` and `kernel.py` (common names, and PyPI packages too) must neither break
flashtune nor be shadowed by it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

APP_PROBE = """
import json, sys
import torch
from flashtune.kernel import attention
from flashtune.kernel.testing import attention_reference
import db, kernel  # the app's own modules, imported after flashtune's
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 48, 16, generator=gen) for _ in range(3))
with torch.no_grad():
    out = attention(q, k, v, is_causal=True)
ref = attention_reference(q, k, v, causal=True)
print(json.dumps({"db": db.WHO, "kernel": kernel.WHO, "db_py": sys.modules["db"].__file__,
                  "max_err": float((out.double() - ref).abs().max()), "shape": list(out.shape),
                  "flashtune_kernel": sys.modules["flashtune.kernel"].__file__}))
"""


def test_an_app_with_its_own_db_and_kernel_modules_runs_flashtune(tmp_path):
    (tmp_path / "db.py").write_text("WHO = 'app db.py'\n")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "__init__.py").write_text("WHO = 'app db/'\n")
    (tmp_path / "kernel.py").write_text("WHO = 'app kernel.py'\n")
    # A user's environment: flashtune as installed, the app's directory first on sys.path (python -c
    # puts the working directory there), the repo root not on PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", APP_PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["db"] == "app db/" and result["kernel"] == "app kernel.py"  # a package wins over a module
    assert Path(result["db_py"]).parent == tmp_path / "db"
    assert tmp_path not in Path(result["flashtune_kernel"]).parents  # flashtune's, wherever it is installed
    assert result["shape"] == [1, 2, 48, 16] and result["max_err"] < 1e-5
