"""`flashtune.tuner.benchmarking.run` and `flashtune bench`: shapes, row assembly with an injected timer, errors,
the CSV schema, one shape as a sweep of one, and `--db`.

On a machine without CUDA the kernel runs under the Triton interpreter on tiny shapes (conftest sets
TRITON_INTERPRET=1); the SDPA flash/efficient/cuDNN providers are then skipped rows.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flashtune.db.store import Store
from flashtune.db.types import Config, Key
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.kernel.testing import attention_reference, fp32_reference, output_errors
from flashtune.tuner.benchmarking.providers import PROVIDERS, select_providers
from flashtune.tuner.benchmarking.results import BASELINES, COLUMNS, BenchRow, BenchShape, read_csv, write_csv
from flashtune.tuner.benchmarking.run import bench_shape, bench_shape_for, with_speedups
from flashtune.tuner.cli import main as cli
from helpers.db import run_info
from helpers.subproc import repo_env

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def fixed_timer(times: dict[str, float], calls: list[str]):
    """A timer returning a fixed ms per provider; it still runs fn once, as a real timer would."""
    def timer(name, fn):
        out = fn()
        assert isinstance(out, torch.Tensor)
        calls.append(name)
        return times.get(name, 10.0)
    return timer


class ReturnsValue:
    """A provider computing the wrong thing (it returns V): its error must be measured, not assumed."""

    name = "wrong_v"
    backend = None
    description = "returns v"

    def unavailable(self, device):
        return None

    def extra_bytes(self, *sizes):
        return 0

    def context(self):
        return contextlib.nullcontext()

    def build(self, q, k, v, causal):
        return lambda: v.clone()


class Raises(ReturnsValue):
    def __init__(self, name, error):
        self.name, self.error = name, error

    def build(self, q, k, v, causal):
        def fail():
            raise self.error
        return fail


# --- shapes --------------------------------------------------------------------------------------

def test_shape_follows_tokens_and_hidden_unless_overridden():
    s = bench_shape_for(1024, 64, "fp16", True)
    assert (s.batch, s.heads, s.seq_len, s.head_dim, s.dtype, s.causal) == (16, 32, 1024, 64, "float16", True)
    assert bench_shape_for(32768, 128, "bf16", False).batch == 1  # at least one sequence
    assert bench_shape_for(4096, 128, "bf16", False).heads == 16
    s = bench_shape_for(512, 64, "fp16", False, tokens=4096, hidden=512)
    assert (s.batch, s.heads) == (8, 8)
    s = bench_shape_for(512, 64, "fp16", False, batch=3, heads=5)
    assert (s.batch, s.heads) == (3, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"),
    (dict(head_dim=20), "head dim 20"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(dtype="fp8"), "fp8 has no SDPA counterpart"),
    (dict(hidden=100), "not a multiple of head dim 64"),
    (dict(batch=0), "batch"),
    (dict(tokens=-1), "tokens"),
])
def test_bad_shapes_are_named(kwargs, match):
    args = dict(seq_len=1024, head_dim=64, dtype="fp16", causal=False) | kwargs
    with pytest.raises(ValueError, match=match):
        bench_shape_for(args.pop("seq_len"), args.pop("head_dim"), args.pop("dtype"), args.pop("causal"), **args)


def test_flops_are_4bhn2d_and_half_when_causal():
    full = BenchShape(2, 3, 128, 64, "float16", False)
    assert full.flops == 4 * 2 * 3 * 128 * 128 * 64
    assert BenchShape(2, 3, 128, 64, "float16", True).flops == full.flops / 2
    assert full.throughput(0.5) == pytest.approx(full.flops / 0.5e-3 / 1e12)


def test_select_providers_keeps_the_tuned_kernel_and_rejects_unknown_names():
    assert [p.name for p in select_providers("sdpa_cudnn,sdpa_math")] == ["flashtune", "sdpa_math", "sdpa_cudnn"]
    assert select_providers(None) == PROVIDERS
    with pytest.raises(ValueError, match="unknown provider.*sdpa_fast"):
        select_providers("sdpa_fast")


# --- measuring one shape -------------------------------------------------------------------------

def test_reference_and_errors_match_float64(kernel_device):
    gen = torch.Generator(device=kernel_device).manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, device=kernel_device) for _ in range(3))
    ref64 = attention_reference(q, k, v, causal=True)
    # chunked (one slice at a time) and whole give the same fp32 reference
    small = fp32_reference(q, k, v, True, max_bytes=1)
    whole = fp32_reference(q, k, v, True)
    torch.testing.assert_close(small, whole, rtol=0, atol=1e-6)
    assert (small.double() - ref64).abs().max() < 1e-5
    wrong = v.clone()
    max_abs, rel = output_errors(wrong, whole)
    assert max_abs == pytest.approx(float((wrong.double() - ref64).abs().max()), rel=1e-4)
    assert rel == pytest.approx(float((wrong.double() - ref64).norm() / ref64.norm()), rel=1e-4)
    wrong[0, 0, 0, 0] = float("nan")
    assert output_errors(wrong, whole) == (math.inf, math.inf)


def test_rows_with_an_injected_timer(kernel_device):
    shape = BenchShape(1, 2, 48, 16, "float32", True)
    calls: list[str] = []
    timer = fixed_timer({"flashtune": 2.0, "sdpa_math": 8.0, "sdpa_flash": 4.0}, calls)
    rows = bench_shape(shape, kernel_device, providers=(*PROVIDERS, ReturnsValue()), timer=timer)
    by = {r.provider: r for r in rows}
    assert [r.provider for r in rows] == [p.name for p in PROVIDERS] + ["wrong_v"]
    tuned = by["flashtune"]
    assert tuned.status == "ok" and tuned.median_ms == 2.0
    assert tuned.tflops == pytest.approx(shape.flops / 2e-3 / 1e12)
    assert tuned.shape == shape
    assert tuned.speedups["sdpa_math"] == pytest.approx(4.0)
    assert tuned.max_abs_err < 1e-5 and tuned.rel_err < 1e-5  # fp32 kernel vs fp32 reference
    assert tuned.note.endswith("(default)") and tuned.note.startswith("m")
    assert (tuned.batch, tuned.heads, tuned.seq_len, tuned.head_dim, tuned.dtype, tuned.causal) == \
        (1, 2, 48, 16, "float32", True)
    math_row = by["sdpa_math"]
    assert math_row.status == "ok" and "sdpa_math" not in math_row.speedups
    assert math_row.rel_err < 1e-6
    wrong = by["wrong_v"]
    assert wrong.status == "ok" and wrong.rel_err > 0.3  # measured, not assumed
    assert wrong.speedups["sdpa_math"] == pytest.approx(8.0 / 10.0)
    if kernel_device == "cpu":
        for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
            assert by[name].status == "skipped" and "CUDA only" in by[name].note
            assert by[name].median_ms is None and not by[name].speedups
        assert "sdpa_flash" not in tuned.speedups
        assert tuned.peak_mem_bytes is None
        assert calls == ["flashtune", "sdpa_math", "wrong_v"]
    else:
        assert tuned.peak_mem_bytes >= 1 * 2 * 48 * 16 * 4  # at least its own output


def test_providers_over_free_memory_are_skipped(kernel_device):
    shape = BenchShape(1, 2, 32, 16, "float32", False)
    calls: list[str] = []
    rows = bench_shape(shape, kernel_device, providers=select_providers("sdpa_math"),
                       timer=fixed_timer({}, calls), free_bytes=lambda device: 1000)
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert all("needs about" in r.note and "GiB free" in r.note for r in rows)
    assert calls == []


def test_a_failing_provider_gets_its_row_and_the_others_still_run(kernel_device):
    shape = BenchShape(1, 1, 16, 16, "float32", False)
    providers = (select_providers("sdpa_math")[1], Raises("boom", RuntimeError("kaboom\nsecond line")),
                 Raises("oom", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")),
                 Raises("refused", RuntimeError("No available kernel. Aborting execution.")))
    rows = bench_shape(shape, kernel_device, providers=providers, timer=fixed_timer({}, []))
    by = {r.provider: r for r in rows}
    assert by["sdpa_math"].status == "ok"
    assert by["boom"].status == "error" and by["boom"].note == "RuntimeError: kaboom"
    assert by["oom"].status == "skipped" and by["oom"].note.startswith("out of memory")
    assert by["refused"].status == "skipped"


def test_with_speedups_uses_only_baselines_that_ran():
    def row(provider, status, ms):
        return BenchRow(1, 1, 128, 64, "float16", False, provider, status, median_ms=ms)
    rows = with_speedups([row("flashtune", "ok", 1.0), row("sdpa_flash", "ok", 1.5),
                          row("sdpa_cudnn", "skipped", None), row("sdpa_math", "error", None)])
    assert rows[0].speedups == {"sdpa_flash": 1.5}
    assert rows[1].speedups == {}
    assert rows[2].speedups == {} and rows[3].speedups == {}


# --- the CSV -------------------------------------------------------------------------------------

def test_csv_schema_and_round_trip(tmp_path):
    rows = [BenchRow(16, 32, 1024, 64, "float16", True, "flashtune", "ok", median_ms=0.25, tflops=412.5,
                     speedups={"sdpa_flash": 1.3, "sdpa_cudnn": 0.85}, max_abs_err=9.8e-4, rel_err=3.1e-4,
                     peak_mem_bytes=67108864, note="m128-n64-w8-s3 (exact)", gpu="NVIDIA H200"),
            BenchRow(16, 32, 1024, 64, "float16", True, "sdpa_math", "skipped",
                     note="needs about 9.0 GiB, 4.0 GiB free", gpu="NVIDIA H200")]
    path = tmp_path / "r.csv"
    write_csv(path, rows)
    header = path.read_text().splitlines()[0]
    assert header == ("provider,batch,heads,seq_len,head_dim,dtype,causal,median_ms,tflops,"
                      "speedup_vs_sdpa_math,speedup_vs_sdpa_flash,speedup_vs_sdpa_efficient,speedup_vs_sdpa_cudnn,"
                      "max_abs_err,rel_err,peak_mem_bytes,status,note,gpu")
    assert tuple(header.split(",")) == COLUMNS
    with open(path, newline="") as fh:
        first = next(csv.DictReader(fh))
    assert first["causal"] == "1" and first["speedup_vs_sdpa_math"] == "" and first["speedup_vs_sdpa_flash"] == "1.3"
    assert read_csv(path) == rows


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    (",".join(COLUMNS) + "\n", "no rows"),
    ("provider,batch\nflashtune,1\n", "missing column"),
    (",".join(COLUMNS) + "\nflashtune,1,2,128,64,float16,0,abc,,,,,,,,,ok,,\n", "line 2.*median_ms.*'abc'"),
    (",".join(COLUMNS) + "\nflashtune,1,2,128,64,float16,0,1.0,,,,,,,,,done,,\n", "line 2.*status 'done'"),
    (",".join(COLUMNS) + "\nflashtune,1,2,128,20,float16,0,1.0,,,,,,,,,ok,,\n", "line 2.*head dim 20"),
    (",".join(COLUMNS) + "\nflashtune,1,2,128,64,float16,0,,,,,,,,,,ok,,\n", "line 2.*positive median_ms"),
    (",".join(COLUMNS) + "\nflashtune,1,2,128,64,float16,2,1.0,,,,,,,,,ok,,\n", "line 2.*causal"),
])
def test_bad_csv_is_named(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_csv(path)


# --- the commands --------------------------------------------------------------------------------

def test_bench_command_writes_table_and_csv(tmp_path, kernel_device):
    out = tmp_path / "sweep.csv"
    result = CliRunner().invoke(cli, ["bench", "--seq", "16,32", "--head-dim", "16", "--dtype", "fp32",
                                      "--no-causal", "--batch", "1", "--heads", "2", "--providers", "sdpa_math",
                                      "--csv", str(out), "--rep-ms", "5", "--warmup-ms", "1"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [(r.provider, r.seq_len, r.status) for r in rows] == [
        ("flashtune", 16, "ok"), ("sdpa_math", 16, "ok"), ("flashtune", 32, "ok"), ("sdpa_math", 32, "ok")]
    assert all(r.rel_err < 1e-5 and r.median_ms > 0 for r in rows)
    assert all(set(r.speedups) == {"sdpa_math"} for r in rows if r.provider == "flashtune")
    assert "flashtune vs sdpa_math: geomean speed-up" in result.output
    assert "[2/2]" in result.output  # the per-shape progress line (not a terminal here)


ONE_SHAPE = ["--seq", "32", "--head-dim", "16", "--dtype", "fp32", "--causal", "--batch", "1", "--heads", "2",
             "--providers", "sdpa_math", "--rep-ms", "5", "--warmup-ms", "1"]


def test_one_shape_is_a_sweep_of_one(kernel_device):
    result = CliRunner().invoke(cli, ["bench", *ONE_SHAPE])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("on ") and "kernel version" in lines[0]
    rows = [ln.split() for ln in lines if ln.startswith(("flashtune ", "sdpa_math ")) and "geomean" not in ln]
    assert [r[:7] for r in rows] == [[p, "1", "2", "32", "16", "float32", "yes"] for p in ("flashtune", "sdpa_math")]
    assert "flashtune vs sdpa_math: geomean speed-up" in result.stdout and "over 1 shape(s)" in result.stdout
    as_json = CliRunner().invoke(cli, ["bench", *ONE_SHAPE, "--json"])
    assert [(r["provider"], r["status"], r["causal"]) for r in json.loads(as_json.stdout)] == [
        ("flashtune", "ok", True), ("sdpa_math", "ok", True)]


@pytest.mark.parametrize("args, message", [
    (["--seq", "64..16"], "--seq: reversed range '64..16'"),
    (["--seq", str(2**70)], f"--seq: sequence length '{2**70}' is above the limit of 2147483647 (2**31 - 1)"),
    (["--head-dim", "20"], "--head-dim: unsupported head dim 20"),
    (["--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
    (["--seq", "64", "--head-dim", "64", "--hidden", "100"], "hidden size 100 is not a multiple of head dim 64"),
    (["--seq", "64", "--tokens", "0"], "--tokens: '0' is out of range: expected a whole number from 1"),
    (["--seq", "64", "--heads", "99999999999"], "--heads: '99999999999' is out of range"),
    (["--seq", "64", "--providers", "sdpa_fast"], "--providers: unknown provider(s) sdpa_fast"),
    (["--seq", "64", "--rep-ms", "0"], "--rep-ms: '0' is out of range: expected a finite number above 0"),
    (["--seq", "64", "--warmup-ms", "nan"], "--warmup-ms: 'nan' is out of range"),
])
def test_bench_command_bad_input_is_one_line_naming_the_option(args, message):
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {message}"), line


def test_bench_command_unwritable_csv_exits_2(tmp_path, kernel_device):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["bench", *ONE_SHAPE, "--csv", str(blocker / "r.csv")])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: cannot write --csv {blocker / 'r.csv'}: Not a directory"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a regression writes into it instead of hanging
    try:
        result = CliRunner().invoke(cli, ["bench", *ONE_SHAPE, "--csv", str(fifo)])
    finally:
        os.close(reader)
    assert result.exit_code == 2 and "not a regular file" in result.output and stat.S_ISFIFO(fifo.stat().st_mode)


def test_bench_db_option_points_the_dispatcher_at_that_database(tmp_path, kernel_device):
    # The flashtune rows run through the dispatcher: after `bench --db URL` it plans with URL's
    # winners (CPU tensors themselves always take the interpreter's default, so ask lookup()).
    from flashtune.kernel import dispatch

    url = f"sqlite:///{tmp_path / 'w.db'}"
    stored = Config(16, 16, 1, 1)
    with Store.open(url) as store:
        run = store.start_run(run_info(arch=INTERPRETER_ARCH))
        store.offer_winner(store.record_trial(run, Key(INTERPRETER_ARCH, "fwd", 32, 16, "float32", True, batch_heads=1), stored,
                                              "ok", median_ms=0.5))
    assert dispatch.lookup(INTERPRETER_ARCH, 32, 16, "float32", True).source != "exact"
    try:
        result = CliRunner().invoke(cli, ["bench", *ONE_SHAPE, "--db", url])
        assert result.exit_code == 0, result.output
        choice = dispatch.lookup(INTERPRETER_ARCH, 32, 16, "float32", True)
        assert (choice.config, choice.source) == (stored, "exact")
    finally:
        dispatch.reload()  # the rest of the session plans with the default database again
    missing = CliRunner().invoke(cli, ["bench", *ONE_SHAPE, "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert missing.exit_code == 2 and "no file at" in missing.output and len(missing.output.splitlines()) == 1
    assert not (tmp_path / "none.db").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_bench_needs_a_gpu_without_the_interpreter():
    env = repo_env(drop=("TRITON_INTERPRET",))
    done = subprocess.run([sys.executable, "-m", "flashtune.tuner.cli", "bench", "--seq", "64"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("Error: the benchmark needs a CUDA GPU (none is visible); on a CPU, "
                                   "TRITON_INTERPRET=1 runs the kernel in the Triton interpreter for tiny shapes only")


def test_baselines_are_the_sdpa_providers():
    assert BASELINES == tuple(p.name for p in PROVIDERS if p.backend is not None)
