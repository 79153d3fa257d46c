"""Environment for tests that run flashtune in a fresh Python process."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def repo_env(*, drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """This process's environment with the repo first on PYTHONPATH (the rest of it kept: on the GPU
    machine sqlalchemy and pydantic come from there), minus `drop`, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(overrides)
    return env
