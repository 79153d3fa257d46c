"""`flashtune show|export|import|db ...` on real databases: output, exit codes, nothing written on errors."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from flashtune.db import exchange
from flashtune.db.schema import SCHEMA_VERSION
from flashtune.db.store import Store
from flashtune.tuner.cli import db as cli_db

from helpers.db import CFG_B, file_digest, populate, snapshot
from helpers.cli import assert_usage_error
from helpers.subproc import repo_env



@click.group()
def cli() -> None:
    pass


cli_db.register(cli)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)




@pytest.fixture
def source(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    with Store.open(url) as store:
        populate(store)
        populate(store, arch="sm_80", gpu_name="NVIDIA A100", kernel_version="k2")
    return url


def test_show_table_and_json(source: str) -> None:
    table = run("show", "--db", source, "--arch", "sm_80", "--head-dim", "128", "--causal")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if line.startswith("sm_")]
    assert len(rows) == 3 and all(str(CFG_B) in row and "NVIDIA A100" in row for row in rows)
    assert "3 winner(s)" in table.stdout
    as_json = run("show", "--db", source, "--json", "--dtype", "fp16")
    with Store.open(source, create=False) as store:
        expected = [exchange.winner_to_dict(w) for w in store.winners()]
    assert json.loads(as_json.stdout) == expected and len(expected) == 24
    none = run("show", "--db", source, "--dtype", "bf16")
    assert none.exit_code == 0 and "no winners" in none.stdout


def test_show_bad_input(source: str, tmp_path: Path) -> None:
    assert_usage_error(run("show", "--db", source, "--arch", "sm_99"), "unknown arch 'sm_99'", "sm_90")
    assert_usage_error(run("show", "--db", source, "--dtype", "int4"), "unknown dtype 'int4'")
    missing = tmp_path / "nothing" / "here.db"
    assert_usage_error(run("show", "--db", f"sqlite:///{missing}"), "no file at", str(missing))
    assert not missing.parent.exists()
    assert_usage_error(run("show", "--db", "oracle://x@y/z"), "unsupported database URL")


def test_export_then_import_elsewhere(source: str, tmp_path: Path, db_url: str) -> None:
    out = tmp_path / "w.json"
    exported = run("export", "--db", source, "--arch", "sm_90", "-o", out)
    assert exported.exit_code == 0 and "exported 12 winner(s)" in exported.stderr
    to_stdout = run("export", "--db", source)
    assert len(json.loads(to_stdout.stdout)["winners"]) == 24
    if db_url.startswith("sqlite"):
        # A dry run against a database that does not exist yet: all adds, no file created.
        dry = run("import", "--db", db_url, out, "--dry-run")
        assert dry.exit_code == 0 and "would add 12" in dry.stdout
        assert dry.stdout.count("  add ") == 12
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
    first = run("import", "--db", db_url, out)
    assert first.exit_code == 0 and first.stdout.startswith("added 12, replaced 0, kept 0, conflicts 0")
    again = run("import", "--db", db_url, out, "--json")
    report = json.loads(again.stdout)
    assert (len(report["added"]), len(report["kept"])) == (0, 12)
    shown = json.loads(run("show", "--db", db_url, "--json").stdout)
    assert shown == json.loads(out.read_text())["winners"]


def test_import_dry_run_lists_and_writes_nothing(source: str, tmp_path: Path) -> None:
    faster = tmp_path / "faster.json"
    with Store.open(source, create=False) as store:
        document = json.loads(exchange.dump_document(exchange.export_winners(store, arch="sm_90")))
    document["winners"][0]["median_ms"] /= 2  # same GPU: replaces under --policy faster
    document["winners"][1]["provenance"]["gpu_name"] = "NVIDIA H100"  # other GPU: a conflict
    document["winners"][1]["median_ms"] /= 2
    faster.write_text(json.dumps(document))
    path = Path(source.removeprefix("sqlite:///"))
    before, digest = snapshot(source), file_digest(path)
    dry = run("import", "--db", source, faster, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines()[0] == ("would add 0, would replace 1, kept 10, conflicts 1 "
                                          "(policy faster; dry run, nothing written)")
    assert dry.stdout.count("  replace ") == 1 and dry.stdout.count("  keep ") == 10
    assert "NVIDIA H100" in dry.stdout and "conflict" in dry.stdout
    assert snapshot(source) == before and file_digest(path) == digest
    real = run("import", "--db", source, faster)
    assert real.stdout.startswith("added 0, replaced 1, kept 10, conflicts 1")
    assert "  keep " not in real.stdout and real.stdout.count("  conflict ") == 1


def test_import_bad_file_leaves_database_byte_for_byte(source: str, tmp_path: Path) -> None:
    path = Path(source.removeprefix("sqlite:///"))
    digest = file_digest(path)
    bad = tmp_path / "bad.json"
    cases = {
        "{oops": "malformed JSON",
        json.dumps({"format": "flashtune-winners", "format_version": 9, "winners": []}): "format version 9",
    }
    for content, needle in cases.items():
        bad.write_text(content)
        for extra in ([], ["--dry-run"], ["--policy", "replace"]):
            assert_usage_error(run("import", "--db", source, bad, *extra), needle, "bad.json")
    assert_usage_error(run("import", "--db", source, tmp_path / "absent.json"), "cannot read")
    assert file_digest(path) == digest
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("source")) == ["source.db"]


def test_bad_databases(source: str, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(run("export", "--db", source).stdout)
    notes = tmp_path / "notes.db"
    notes.write_text("not sqlite " * 50)
    digest = file_digest(notes)
    for command in (["import", good], ["show"], ["export"], ["db", "vacuum"], ["db", "migrate"]):
        assert_usage_error(run(*command, "--db", f"sqlite:///{notes}"), "not a SQLite file")
    assert file_digest(notes) == digest
    assert_usage_error(run("import", good, "--db", "sqlite:////proc/flashtune/x.db"), "cannot create directory")
    assert_usage_error(run("import", good, "--db", "sqlite:////proc/x.db"), "unavailable")
    unreachable = "postgresql+psycopg://u:hunter2@127.0.0.1:1/test?connect_timeout=2"
    result = run("import", good, "--db", unreachable)
    # Where psycopg is not installed (the GPU machine) the same URL names the missing driver instead.
    has_driver = importlib.util.find_spec("psycopg") is not None
    assert_usage_error(result, "unreachable" if has_driver else "'.[postgres]'", "***")
    assert "hunter2" not in result.stderr


def test_newer_schema_is_refused(source: str) -> None:
    with Store.open(source) as store:
        with store._engine.begin() as conn:
            conn.execute(text(f"UPDATE flashtune_meta SET value = '{SCHEMA_VERSION + 1}' WHERE name = 'schema_version'"))
    for command in (["show"], ["export"], ["db", "migrate"]):
        assert_usage_error(run(*command, "--db", source), f"schema version {SCHEMA_VERSION + 1}",
                           f"version {SCHEMA_VERSION}")


def test_db_path(tmp_path: Path) -> None:
    env = {"FLASHTUNE_DB": "", "XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert run("db", "path", env=env).stdout.strip() == str(tmp_path / "xdg" / "flashtune" / "flashtune.db")
    env["FLASHTUNE_DB"] = f"sqlite:///{tmp_path}/env.db"
    assert run("db", "path", env=env).stdout.strip() == f"{tmp_path}/env.db"
    pg = run("db", "path", "--db", "postgresql+psycopg://me:pw@db.example/tuning")
    assert pg.stdout.strip() == "postgresql+psycopg://me:***@db.example/tuning"


def test_db_migrate_and_vacuum(db_url: str) -> None:
    created = run("db", "migrate", "--db", db_url)
    assert created.exit_code == 0 and f"created schema version {SCHEMA_VERSION}" in created.stdout
    assert f"already at schema version {SCHEMA_VERSION}" in run("db", "migrate", "--db", db_url).stdout
    with Store.open(db_url) as store:
        populate(store)
        store.prune("other")
    before = snapshot(db_url)
    vacuumed = run("db", "vacuum", "--db", db_url)
    assert vacuumed.exit_code == 0 and "vacuumed" in vacuumed.stdout
    assert snapshot(db_url) == before


# --- where `export -o` writes -------------------------------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_export_to_a_new_file_honours_the_umask(source: str, tmp_path: Path, umask_027: None) -> None:
    out = tmp_path / "new.json"
    result = run("export", "--db", source, "-o", out)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
    assert len(json.loads(out.read_text())["winners"]) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "source.db"]  # no temporary file left


def test_export_replaces_a_regular_file_keeping_its_mode(source: str, tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    out.write_text("old")
    out.chmod(0o644)
    assert run("export", "--db", source, "-o", out, "--arch", "sm_80").exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and len(json.loads(out.read_text())["winners"]) == 12


def test_export_through_a_symlink_replaces_the_file_it_points_to(source: str, tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert run("export", "--db", source, "-o", link).exit_code == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(json.loads(target.read_text())["winners"]) == 24


def test_export_dash_writes_stdout(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("export", "--db", source, "-o", "-")
    assert len(json.loads(result.stdout)["winners"]) == 24 and not (tmp_path / "-").exists()


def test_export_refuses_a_fifo_a_directory_and_a_link_to_a_device(source: str, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    # A link to /dev/null, not /dev/null itself: before the fix this replaced the target with a
    # regular file, and the test must not be able to break the machine's /dev/null when it fails.
    device_link = tmp_path / "null"
    device_link.symlink_to("/dev/null")
    for target, kind in ((fifo, "not a regular file"), (directory, "a directory"), (device_link, "not a regular file")):
        assert_usage_error(run("export", "--db", source, "-o", target), f"-o {target}: it is {kind}",
                           "refusing to replace it")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and list(directory.iterdir()) == []
    assert device_link.is_symlink() and os.readlink(device_link) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo", "null", "source.db"]


def test_writes_under_a_path_no_one_can_create_fail_cleanly(source: str, tmp_path: Path) -> None:
    # Where the database or the export would go cannot exist, even for root (CI runs as root, so a
    # read-only directory proves nothing there): its parent is a regular file, or it is under /proc.
    good = tmp_path / "good.json"
    good.write_text(run("export", "--db", source).stdout)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for url in (f"sqlite:///{blocker}/flashtune.db", "sqlite:////proc/flashtune-test/flashtune.db"):
        for command in (["import", good], ["db", "migrate"]):
            assert_usage_error(run(*command, "--db", url), "flashtune")
    assert_usage_error(run("export", "--db", source, "-o", blocker / "w.json"),
                       f"cannot write -o {blocker / 'w.json'}: Not a directory")
    assert blocker.read_text() == "keep me"


def test_real_entry_point_and_no_gpu_imports(tmp_path: Path) -> None:
    env = repo_env(FLASHTUNE_DB=f"sqlite:///{tmp_path}/none.db")
    probe = ("import sys, flashtune.db.exchange, flashtune.tuner.cli.db, flashtune.tuner.cli.common; "
             "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "flashtune.tuner.cli", "show"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "no file at" in result.stderr
    assert not (tmp_path / "none.db").exists()
