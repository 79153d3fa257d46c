"""`flashtune doctor` and `flashtune profile` (the ncu command and reading ncu's raw CSV)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from helpers.db import populate
from flashtune.db.store import Store
from flashtune.kernel.version import op_version
from flashtune.tuner.cli import main as cli
from flashtune.tuner.benchmarking.ncu import KERNEL_NAME, find_ncu, ncu_command, parse_raw_csv, summarize
from flashtune.tuner.cli.profile import NO_GPU
from helpers.subproc import repo_env

FWD_VERSION = op_version("fwd")

HAS_CUDA = torch.cuda.is_available()


def doctor(*args: str):
    return CliRunner().invoke(cli, ["doctor", *args])


# --- doctor --------------------------------------------------------------------------------------

def test_doctor_reports_database_counts_and_stale_winners(sqlite_url):
    with Store.open(sqlite_url) as store:
        populate(store, kernel_version="0123456789ab")  # 12 winners of sm_90, another kernel version
        populate(store, arch="sm_86", gpu_name="NVIDIA A10", kernel_version=FWD_VERSION)
    result = doctor("--db", sqlite_url, "--json")
    report = json.loads(result.output)
    by_topic = {}
    for f in report["findings"]:
        by_topic.setdefault(f["topic"], []).append(f)
    database = by_topic["database"][0]
    assert database["level"] == "ok"
    assert "schema version" in database["message"] and "24 winners" in database["message"]
    assert by_topic["winners"][0]["message"] == "sm_86: 12, sm_90: 12"
    stale = by_topic["stale winners"][0]
    assert stale["level"] == "warn" and stale["message"].startswith("12 of 24 winners")
    assert "0123456789ab" in stale["message"] and FWD_VERSION in stale["message"]
    assert any(FWD_VERSION in f["message"] for f in by_topic["software"])
    # Stale winners and (here) no GPU under the interpreter are warnings: a working setup exits 0.
    assert not [f for f in report["findings"] if f["level"] == "fail"], report
    assert result.exit_code == 0 and report["healthy"] is True


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU report")
def test_doctor_without_a_gpu_says_so_and_runs_the_interpreter(sqlite_url):
    # conftest set TRITON_INTERPRET=1: no GPU is then a warning, and the kernel runs on the CPU.
    with Store.open(sqlite_url) as store:
        populate(store, kernel_version=FWD_VERSION)
    result = doctor("--db", sqlite_url)
    assert result.exit_code == 0, result.output
    assert "[WARN] GPU: no CUDA GPU visible" in result.output
    assert "[  OK] kernel: causal (1, 2, 32, 16) float32 on cpu" in result.output
    assert result.output.rstrip().endswith("healthy")


def test_doctor_fails_on_an_unreadable_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 10)
    result = doctor("--db", f"sqlite:///{junk}", "--no-run")
    assert result.exit_code == 1
    assert "[FAIL] database" in result.output and "is not a SQLite file" in result.output
    assert "problem(s): database" in result.output.splitlines()[-1]


def test_doctor_on_a_fresh_machine_warns_but_is_not_broken_by_a_missing_database(tmp_path):
    result = doctor("--db", f"sqlite:///{tmp_path / 'none.db'}", "--no-run", "--json")
    findings = json.loads(result.output)["findings"]
    db = [f for f in findings if f["topic"] == "database"]
    assert db[0]["level"] == "warn" and "nothing is tuned" in db[0]["message"]
    assert not (tmp_path / "none.db").exists()


def test_doctor_bad_url_is_one_line_without_a_traceback():
    # A [FAIL] line (exit 1) or bad input (exit 2): either way one line naming the URL, never a traceback.
    result = doctor("--db", "mysql://x@y/z", "--no-run")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (1, 2)
    assert [ln for ln in result.output.splitlines() if "unsupported database URL 'mysql://x@y/z'" in ln]


# --- profile -------------------------------------------------------------------------------------

def test_profile_dry_run_prints_the_ncu_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'tuned.db'}"
    result = CliRunner().invoke(cli, ["profile", "--seq", "4096", "--head-dim", "128", "--dtype", "fp16",
                                      "--causal", "--warmup-ms", "7", "--report", "out/prof", "--db", url, "--dry-run"])
    assert result.exit_code == 0, result.output
    command = shlex.split(result.output.strip().splitlines()[-1])
    assert command[0].endswith("ncu")
    joined = " ".join(command)
    for part in ("--clock-control none", "--nvtx --nvtx-include flashtune/", f"-k regex:{KERNEL_NAME}",
                 "--launch-skip 0 --launch-count 1", "--set full", "-o out/prof"):
        assert part in joined
    tail = command[command.index("-m"):]
    assert tail == ["-m", "flashtune.tuner.cli", "profile", "--seq", "4096", "--head-dim", "128", "--dtype", "float16",
                    "--causal", "--batch", "4", "--heads", "16", "--warmup-ms", "7", "--db", url]
    # The printed command is itself a valid invocation (ncu re-runs it without --dry-run).
    again = CliRunner().invoke(cli, [*tail[2:], "--dry-run", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ncu_command"][-len(tail):] == tail


def test_the_kernel_name_filter_matches_the_triton_kernel():
    from flashtune.kernel.jit.fwd import attn_fwd_kernel

    assert attn_fwd_kernel.fn.__name__ == KERNEL_NAME


def test_ncu_command_reruns_profile_without_run_ncu():
    command = ncu_command(["--seq", "128"], report="r", ncu="/opt/ncu", python="py")
    assert command[:1] == ["/opt/ncu"] and command[-6:] == ["py", "-m", "flashtune.tuner.cli", "profile", "--seq", "128"]
    assert "--run-ncu" not in command


@pytest.mark.parametrize("args, message", [
    (["--head-dim", "20"], "--head-dim: unsupported head dim 20"),
    (["--dtype", "int4"], "--dtype: unknown dtype 'int4'"),
    (["--seq", "64,128"], "--seq: malformed sequence length '64,128': expected one whole number"),
    (["--warmup-ms", "-1"], "--warmup-ms: '-1' is out of range: expected a finite number at least 0"),
    (["--hidden", "100"], "hidden size 100 is not a multiple of head dim 128"),
    (["--both"], "--both: this command is about one shape; give --causal or --no-causal"),
])
def test_profile_bad_input_is_one_line_naming_the_option(args, message):
    result = CliRunner().invoke(cli, ["profile", *args, "--dry-run"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {message}"), line


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU advice")
def test_profile_without_a_gpu_gives_advice_that_works():
    # Before: without the interpreter it advised TRITON_INTERPRET=1, which then failed as well.
    args = ["profile", "--seq", "64", "--head-dim", "16"]
    plain = subprocess.run([sys.executable, "-m", "flashtune.tuner.cli", *args], capture_output=True, text=True,
                           env=repo_env(drop=("TRITON_INTERPRET",)), timeout=120)
    interpreted = CliRunner().invoke(cli, args)  # this process runs under the interpreter (conftest)
    for code, err in ((plain.returncode, plain.stderr), (interpreted.exit_code, interpreted.output)):
        assert code == 2 and err.strip() == f"Error: {NO_GPU}" and "TRITON_INTERPRET" not in err
    advised = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert advised.exit_code == 0, advised.output
    assert "ncu --clock-control none" in advised.output


@pytest.mark.skipif(find_ncu() is not None, reason="ncu is installed here")
def test_run_ncu_without_ncu_exits_2():
    result = CliRunner().invoke(cli, ["profile", "--run-ncu", "--dry-run"])
    assert result.exit_code == 2 and "--run-ncu: no ncu executable" in result.output


RAW = '''==PROF== Connected to process 1234 (/usr/bin/python3.12)
"ID","Process ID","Process Name","Host Name","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","dram__throughput.avg.pct_of_peak_sustained_elapsed","launch__grid_size","launch__block_size"
"","","","","","usecond","register/thread","%","%","%","",""
"0","1234","python3.12","host","attn_fwd_kernel","512.26","186","12.41","71.90","9.53","2048","256"
'''


def test_raw_csv_summary_names_occupancy_tensor_and_memory():
    kernels = parse_raw_csv(RAW)
    assert len(kernels) == 1 and kernels[0]["Kernel Name"] == ("attn_fwd_kernel", "")
    summary = dict(summarize(kernels[0]))
    assert summary["duration"] == "512.26 usecond"
    assert summary["achieved occupancy"] == "12.41 %"
    assert summary["tensor pipe active"] == "71.90 %"
    assert summary["DRAM throughput"] == "9.53 %"
    assert summary["registers per thread"] == "186 register/thread"
    assert summary["grid / block"] == "2048 / 256"
    assert parse_raw_csv("==PROF== nothing profiled\n") == []
