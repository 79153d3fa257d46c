"""The wheel, installed as a user installs it: a regular (not editable) install into a fresh virtual environment.

The wheel is built from a copy of the checkout, installed with `pip install --no-deps` into a venv that sees
this interpreter's packages (torch, triton, sqlalchemy: installing them again would take minutes) through a
.pth file, and then used from a folder outside the checkout, with the checkout off PYTHONPATH: every module
comes from the venv.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("kernel", "db", "tuner")
BUNDLE_PROBE = "db/bundled/packaging-probe.json"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the shared checkout.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ROOTS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    # A bundle file as the lead ships them (db/bundled/<model>.json), for a model no GPU is named after: the
    # wheel must carry it as package data even before a real one is committed.
    (src / BUNDLE_PROBE).write_text('{"format": "flashtune-winners", "format_version": 2, "winners": []}\n')
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = (tmp / "dist").glob("flashtune-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    # This interpreter's packages (it may itself be a venv, whose packages --system-site-packages would not
    # show) go on the new one's path after its own site-packages. A directory named in a .pth file is not
    # scanned for .pth files itself, so an editable install of the checkout there stays invisible.
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(own, "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _user_env() -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH (other entries stay: on the GPU machine the
    database packages come from there)."""
    env = dict(os.environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join(kept)
    env["TRITON_INTERPRET"] = "1"
    return env


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=_user_env(), capture_output=True, text=True,
                          timeout=600)


def test_the_wheel_holds_every_source_file_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    stray = [n for n in names if not n.startswith("flashtune/") and not
             (n.startswith("flashtune-") and n.split("/")[0].endswith(".dist-info"))]
    assert stray == []
    sources = {f"flashtune/{p.relative_to(REPO).as_posix()}" for root in ROOTS
               for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sources) > 50
    assert sorted(sources - names) == []
    bundles = {f"flashtune/{p.relative_to(REPO).as_posix()}" for p in (REPO / "db" / "bundled").glob("*.json")}
    assert sorted((bundles | {f"flashtune/{BUNDLE_PROBE}"}) - names) == []


def test_console_scripts_run_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    bin_dir = venv / "bin"
    for argv, expect in (([bin_dir / "tune", "--help"], "Usage: tune"),
                         ([bin_dir / "flashtune", "--help"], "Usage: flashtune"),
                         ([bin_dir / "tune", "--dry-run", "--arch", "sm_86"], "sm_86")):
        done = _run(venv, *argv, cwd=tmp_path)
        assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
        assert expect in done.stdout
        assert "Traceback" not in done.stderr


IMPORT_ALL = """
import importlib, json, pathlib, pkgutil, sys
import flashtune
found, failed = [], {}
for info in pkgutil.walk_packages(flashtune.__path__, "flashtune."):
    if info.name.endswith(".__main__"):  # runs the CLI when imported; the scripts test covers it
        continue
    try:
        module = importlib.import_module(info.name)
    except Exception as error:
        failed[info.name] = f"{type(error).__name__}: {error}"
        continue
    found.append((info.name, str(pathlib.Path(module.__file__).resolve())))
print(json.dumps({"found": found, "failed": failed}))
"""


def test_every_module_imports_from_the_venv(venv: Path, tmp_path: Path) -> None:
    import json

    done = _run(venv, venv / "bin" / "python", "-c", IMPORT_ALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    modules = dict(result["found"])
    expected = {"flashtune." + p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(
        ".__init__") for root in ROOTS for p in (REPO / root).rglob("*.py")
        if "__pycache__" not in p.parts and p.name != "__main__.py"}
    assert sorted(expected - set(modules)) == []
    outside = {name: path for name, path in modules.items() if Path(venv).resolve() not in Path(path).parents}
    assert outside == {}
