"""`flashtune show --bundled`, `flashtune import --from-bundled` and `flashtune export --bundle` on real SQLite
files and real bundle files in a temporary FLASHTUNE_BUNDLED_DIR."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from flashtune.db import bundled, exchange
from flashtune.db.store import Store
from flashtune.db.types import Config
from flashtune.tuner.cli import db as cli_db
from helpers.bundled import A100, H100_PCIE, H100_SXM, write_bundle
from helpers.cli import one_line_error
from helpers.dispatch import key

CFG = Config(64, 64, 4, 3)
OTHER = Config(128, 32, 8, 2)


@click.group()
def cli() -> None:
    pass


cli_db.register(cli)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def bundle_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "bundled"
    where.mkdir()
    monkeypatch.setenv(bundled.DIR_ENV_VAR, str(where))
    return where


def test_show_bundled_table_and_json(bundle_dir: Path) -> None:
    write_bundle(bundle_dir, [(key(1024), CFG), (key(2048, d=128), CFG)], H100_SXM)
    write_bundle(bundle_dir, [(key(512, arch="sm_80"), OTHER)], A100, kernel_version="0123456789ab")
    table = run("show", "--bundled")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if line.startswith("sm_")]
    assert len(rows) == 3 and sum("(stale)" in r for r in rows) == 1
    assert "3 bundled winner(s)" in table.stdout and "1 stale" in table.stdout and bundled.REGENERATE in table.stdout
    as_json = json.loads(run("show", "--bundled", "--json", "--arch", "sm_90", "--head-dim", "64").stdout)
    assert len(as_json) == 1
    [one] = as_json
    assert (one["source"], one["file"], one["stale"]) == ("bundled", "h100-80gb-hbm3.json", False)
    assert one["key"]["seq_len"] == 1024 and one["provenance"]["gpu_name"] == H100_SXM.name
    assert "no bundled winners" in run("show", "--bundled", "--op", "bwd").stdout
    assert one_line_error(run("show", "--bundled", "--recorded"), "pass one")


def test_import_from_bundled_into_sqlite(bundle_dir: Path, tmp_path: Path) -> None:
    write_bundle(bundle_dir, [(key(1024), CFG), (key(2048), CFG)], H100_SXM)
    write_bundle(bundle_dir, [(key(512, arch="sm_80"), OTHER)], A100, kernel_version="0123456789ab")
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    done = run("import", "--from-bundled", "--db", url)
    assert done.exit_code == 0, done.output
    assert "added 2" in done.stdout and "left out 1 stale" in done.stderr
    with Store.open(url, create=False) as store:
        stored = {w.key: w for w in store.winners()}
    assert set(stored) == {key(1024), key(2048)}
    assert all(w.config == CFG and w.gpu_name == H100_SXM.name and w.sm_count == 132 for w in stored.values())
    again = run("import", "--from-bundled", "--db", url, "--json")
    report = json.loads(again.stdout)
    assert report["added"] == [] and len(report["kept"]) == 2 and report["path"].startswith("bundled:")


def test_import_from_bundled_picks_a_model(bundle_dir: Path, tmp_path: Path) -> None:
    write_bundle(bundle_dir, [(key(1024), CFG)], H100_SXM)
    write_bundle(bundle_dir, [(key(1024), OTHER)], H100_PCIE)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    # Two models of one arch: the database keys winners by arch, so one must be chosen.
    one_line_error(run("import", "--from-bundled", "--db", url), "2 GPU models", "--gpu")
    assert not (tmp_path / "fleet.db").exists()
    done = run("import", "--from-bundled", "--gpu", "NVIDIA H100 PCIe", "--db", url)
    assert done.exit_code == 0, done.output
    with Store.open(url, create=False) as store:
        [winner] = store.winners()
    assert winner.config == OTHER and winner.gpu_name == H100_PCIE.name
    one_line_error(run("import", "--from-bundled", "--gpu", "h200", "--db", url), "no bundle h200.json")
    one_line_error(run("import", "--db", url), "--from-bundled")
    one_line_error(run("import", "--gpu", "h200", str(tmp_path / "x.json")), "--from-bundled")


def test_export_bundle_then_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    write_bundle(source, [(key(1024), CFG)], H100_SXM)
    write_bundle(source, [(key(512, arch="sm_80"), OTHER)], A100)
    url = f"sqlite:///{tmp_path / 'tuned.db'}"
    for path in sorted(source.glob("*.json")):
        assert run("import", str(path), "--db", url).exit_code == 0
    out = tmp_path / "out"
    done = run("export", "--db", url, "--bundle", out)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["a100-sxm4-80gb.json", "h100-80gb-hbm3.json"]
    [winner] = bundled.read_bundle(out / "h100-80gb-hbm3.json", strict=True)
    assert winner.key == key(1024) and winner.gpu_name == H100_SXM.name
    document = json.loads((out / "h100-80gb-hbm3.json").read_text())
    assert document["format"] == exchange.FORMAT and "trials" not in document  # winners only
    monkeypatch.setenv(bundled.DIR_ENV_VAR, str(out))
    assert "2 bundled winner(s)" in run("show", "--bundled").stdout
    one_line_error(run("export", "--db", url, "--bundle", out, "-o", tmp_path / "x.json"), "leave out -o")
