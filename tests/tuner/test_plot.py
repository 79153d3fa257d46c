"""`flashtune plot`: sweep figures from a fixture CSV, the heatmap from a real SQLite database, bad input."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashtune.db.store import Store
from flashtune.db.types import Config, Key
from flashtune.tuner.benchmarking.results import MAX_CSV_BYTES, read_csv
from flashtune.kernel.version import OP_VERSIONS
from helpers.db import run_info
from flashtune.tuner.cli import main as cli
from helpers.subproc import repo_env

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bench_sample.csv"
PNG = b"\x89PNG\r\n\x1a\n"
def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


needs_matplotlib = pytest.mark.skipif(not _has_matplotlib(),
                                      reason="matplotlib is not installed (pip install matplotlib)")


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


@needs_matplotlib
def test_sweep_figures_from_fixture_csv(tmp_path):
    out = tmp_path / "figs"
    result = CliRunner().invoke(cli, ["plot", str(FIXTURE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    groups = {r.group for r in read_csv(FIXTURE)}
    assert groups == {(64, "float16", False), (128, "float16", True)}
    expected = {f"{metric}_d{d}_{dt}_{'causal' if c else 'full'}.png"
                for metric in ("latency", "speedup", "tflops") for d, dt, c in groups}
    assert {p.name for p in out.iterdir()} == expected
    assert all(is_png(out / name) for name in expected)
    assert sorted(result.output.split()) == sorted(str(out / name) for name in expected)


def make_db(url: str, key: Key, kernel_version: str = OP_VERSIONS["fwd"]) -> dict[tuple[int, int], float]:
    """Trials of `key` on a real SQLite file; returns the best ok time per (block_m, block_n)."""
    trials = [(Config(64, 32, 4, 2), "ok", 0.9), (Config(64, 32, 4, 3), "ok", 0.7),
              (Config(64, 64, 4, 2), "ok", 0.6), (Config(128, 64, 8, 3), "ok", 0.5),
              (Config(128, 64, 4, 3), "ok", 0.8), (Config(128, 128, 8, 4), "out_of_resources", None),
              (Config(64, 128, 4, 2), "wrong_result", None), (Config(64, 128, 8, 2), "ok", 1.1)]
    with Store.open(url) as store:
        run = store.start_run(run_info(kernel_version=kernel_version))
        for config, outcome, ms in trials:
            store.record_trial(run, key, config, outcome, median_ms=ms, tflops=None if ms is None else 100 / ms,
                               error=None if ms else f"{outcome} (fixture)")
        store.finish_run(run)
    best: dict[tuple[int, int], float] = {}
    for config, outcome, ms in trials:
        if outcome == "ok":
            cell = (config.block_m, config.block_n)
            best[cell] = min(ms, best.get(cell, ms))
    return best


KEY = Key("sm_90", "fwd", 1024, 64, "float16", True)
HEATMAP_ARGS = ["--heatmap", "--arch", "sm_90", "--seq", "1024", "--head-dim", "64", "--dtype", "fp16", "--causal"]


@needs_matplotlib
def test_heatmap_from_a_real_database(tmp_path, sqlite_url):
    make_db(sqlite_url, KEY)
    out = tmp_path / "heat"
    result = CliRunner().invoke(cli, ["plot", *HEATMAP_ARGS, "--db", sqlite_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    path = out / "heatmap_sm_90_n1024_d64_float16_causal.png"
    assert result.output.strip() == str(path)
    assert is_png(path)


def test_heatmap_cells_are_the_best_trial_per_tile(sqlite_url):
    from flashtune.tuner.benchmarking.plots import _cells

    best = make_db(sqlite_url, KEY)
    with Store.open(sqlite_url, create=False) as store:
        cells = _cells(store.trials(KEY))
    assert {c: t.median_ms for c, t in cells.items() if t.outcome == "ok"} == best
    assert cells[(128, 128)].outcome == "out_of_resources"  # tried, never ran: marked, not blank
    assert cells[(64, 128)].outcome == "ok"  # an ok trial beats a wrong one in the same cell


@pytest.mark.parametrize("args, match", [
    (["--seq", "2048"], "no trials for sm_90/fwd/N=2048/D=64/float16/causal"),
    (["--kernel-version", "other"], "no trials .* with kernel version other"),
])
def test_heatmap_key_without_trials_exits_2(tmp_path, sqlite_url, args, match):
    make_db(sqlite_url, KEY)
    result = CliRunner().invoke(cli, ["plot", *HEATMAP_ARGS, *args, "--db", sqlite_url, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert re.search(match, result.output), result.output


@needs_matplotlib
def test_heatmap_of_another_kernel_version_needs_any(tmp_path, sqlite_url):
    make_db(sqlite_url, KEY, kernel_version="0123456789ab")
    runner = CliRunner()
    result = runner.invoke(cli, ["plot", *HEATMAP_ARGS, "--db", sqlite_url, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "8 trial(s) of other kernel versions: pass --kernel-version any" in result.output
    result = runner.invoke(cli, ["plot", *HEATMAP_ARGS, "--kernel-version", "any", "--db", sqlite_url,
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_heatmap_needs_a_readable_database_and_a_whole_key(tmp_path):
    runner = CliRunner()
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    result = runner.invoke(cli, ["plot", *HEATMAP_ARGS, "--db", missing, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no file at" in result.output
    assert not (tmp_path / "none.db").exists()  # plotting never creates a database
    result = runner.invoke(cli, ["plot", "--heatmap", "--arch", "sm_90", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--heatmap needs --seq, --head-dim, --dtype" in result.output
    result = runner.invoke(cli, ["plot", "--heatmap", "--arch", "sm_99", "--seq", "1", "--head-dim", "64",
                                 "--dtype", "fp16", "--out", str(tmp_path)])
    assert one_line_error(result).startswith("Error: --arch: unknown arch 'sm_99'")
    for args, message in ((["--seq", str(2**70)], f"--seq: sequence length '{2**70}' is above the limit"),
                          (["--head-dim", str(10**30)], "--head-dim: unsupported head dim '1000"),
                          (["--both"], "--both: this command is about one shape")):
        result = runner.invoke(cli, ["plot", *HEATMAP_ARGS[:-1], *args, "--db", missing, "--out", str(tmp_path)])
        assert one_line_error(result).startswith(f"Error: {message}")


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("provider,batch,heads\n", "missing column"),
    (None, "has a header but no rows"),
    ("BAD", "line 3: column 'median_ms' holds 'fast'"),
    ("SKIPPED", "no row of the CSV has status 'ok'"),
    ("DUP", "two rows for flashtune at N=512"),
])
def test_bad_csv_exits_2(tmp_path, content, match):
    lines = FIXTURE.read_text().splitlines()
    if content is None:
        content = lines[0] + "\n"
    elif content == "BAD":
        content = "\n".join([lines[0], lines[1], lines[2].replace(lines[2].split(",")[7], "fast", 1)]) + "\n"
    elif content == "SKIPPED":
        content = "\n".join([lines[0]] + [ln for ln in lines[1:] if ",skipped," in ln]) + "\n"
    elif content == "DUP":
        content = "\n".join([lines[0], lines[1], lines[1]]) + "\n"
    path = tmp_path / "r.csv"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["plot", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert match in result.output


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def plot_in_a_subprocess(path: Path, out: Path) -> subprocess.CompletedProcess:
    # A FIFO or a device must be refused before it is read: before the fix these hung or ran out of
    # memory, so they run in a process with a deadline rather than inside the test process.
    return subprocess.run([sys.executable, "-m", "flashtune.tuner.cli", "plot", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=repo_env(), timeout=60)


def test_plot_refuses_a_fifo_and_a_device_without_reading_them(tmp_path):
    fifo = tmp_path / "results.csv"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device")):
        done = plot_in_a_subprocess(path, tmp_path / "o")
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"Error: cannot read CSV {path}: it is {kind}, not a regular file"
    assert not (tmp_path / "o").exists()


def test_plot_refuses_a_directory_and_an_oversized_or_endless_line(tmp_path):
    line = one_line_error(CliRunner().invoke(cli, ["plot", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert line == f"Error: cannot read CSV {tmp_path}: it is a directory, not a regular file"
    no_newline = tmp_path / "one-line.csv"
    no_newline.write_bytes(b"x" * 10_000_000)  # 10 MB, no newline: one field over csv's field limit
    line = one_line_error(CliRunner().invoke(cli, ["plot", str(no_newline), "--out", str(tmp_path / "o")]))
    assert line.startswith(f"Error: {no_newline} line ") and "malformed CSV: field larger than field limit" in line
    big = tmp_path / "big.csv"
    with open(big, "wb") as fh:
        fh.truncate(MAX_CSV_BYTES + 1)  # sparse: nothing is written, the size is what counts
    line = one_line_error(CliRunner().invoke(cli, ["plot", str(big), "--out", str(tmp_path / "o")]))
    assert line == f"Error: CSV {big} is {MAX_CSV_BYTES + 1} bytes, larger than the {MAX_CSV_BYTES}-byte limit"


def test_plotting_a_csv_imports_no_torch():
    # `plot` of a CSV runs on machines that only want the figures (and torch takes seconds to import).
    probe = ("import sys; import flashtune.tuner.cli.plot; from flashtune.tuner.benchmarking import plots, results; "
             f"results.read_csv({str(FIXTURE)!r}); print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=repo_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_plot_names_a_csv_that_is_not_utf8(tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(FIXTURE.read_bytes().replace(b"fixture", "fixture \u00e9".encode("latin-1")))
    line = one_line_error(CliRunner().invoke(cli, ["plot", str(latin), "--out", str(tmp_path / "o")]))
    assert line.startswith(f"Error: {latin} is not UTF-8 text (byte ")


@pytest.mark.parametrize("column, value, message", [
    ("seq_len", str(10**400), "column 'seq_len' holds '100000000000000000000000...', expected a whole number from 0 to 2147483647"),
    ("seq_len", "9" * 5000, "column 'seq_len' holds '999999999999999999999999...', expected a whole number"),
    ("seq_len", str(2**63), f"column 'seq_len' holds '{2**63}', expected a whole number from 0 to 2147483647"),
    ("batch", str(2**40), f"column 'batch' holds '{2**40}', expected a whole number from 0 to 2147483647"),
    ("median_ms", "1e999", "column 'median_ms' holds '1e999', expected a finite number"),
])
def test_plot_refuses_numbers_no_figure_can_hold(tmp_path, column, value, message):
    header, first, *rest = FIXTURE.read_text().splitlines()
    cells = first.split(",")
    cells[header.split(",").index(column)] = value
    path = tmp_path / "huge.csv"
    path.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    line = one_line_error(CliRunner().invoke(cli, ["plot", str(path), "--out", str(tmp_path / "o")]))
    assert line == f"Error: {path} line 2: {message}"


def test_missing_csv_and_argument_mistakes_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["plot", str(tmp_path / "nope.csv"), "--out", str(tmp_path)])
    assert one_line_error(result) == f"Error: cannot read CSV {tmp_path / 'nope.csv'}: No such file or directory"
    result = runner.invoke(cli, ["plot", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "give the CSV" in result.output
    result = runner.invoke(cli, ["plot", str(FIXTURE), *HEATMAP_ARGS, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not both" in result.output


def test_unwritable_output_directory_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["plot", str(FIXTURE), "--out", str(blocker / "figs")])
    assert result.exit_code == 2
    assert f"cannot write to --out {blocker / 'figs'}" in result.output


def test_missing_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    result = CliRunner().invoke(cli, ["plot", str(FIXTURE), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "pip install matplotlib" in result.output and "'.[plot]'" in result.output
    assert list(tmp_path.iterdir()) == []
