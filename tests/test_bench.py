"""`flashtune.tuner.benchmarking.run` and `flashtune bench`: shapes, row assembly with an injected timer, errors, the CSV schema.

On a machine without CUDA the kernel runs under the Triton interpreter on tiny shapes (conftest sets
TRITON_INTERPRET=1); the SDPA flash/efficient/cuDNN providers are then skipped rows.
"""
from __future__ import annotations

import contextlib
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flashtune.tuner.benchmarking.run import (BenchShape, bench_shape, bench_shape_for, fp32_reference, main, output_errors,
                          with_speedups)
from flashtune.tuner.benchmarking.results import BASELINES, COLUMNS, BenchRow, read_csv, write_csv
from flashtune.tuner.benchmarking.providers import PROVIDERS, select_providers
from flashtune.kernel.reference import attention_reference
from flashtune.tuner.cli import main as cli
from subproc import repo_env

REPO = Path(__file__).resolve().parents[1]
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
    (dict(head_dim=48), "head dim 48"),
    (dict(dtype="int8"), "unknown dtype"),
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
    (",".join(COLUMNS) + "\nflashtune,1,2,128,48,float16,0,1.0,,,,,,,,,ok,,\n", "line 2.*head dim 48"),
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


@pytest.mark.parametrize("args, match", [
    (["--seq", "64..16"], "--seq: reversed range"),
    (["--head-dim", "48"], "--head-dim"),
    (["--dtype", "int8"], "--dtype"),
    (["--seq", "64", "--head-dim", "64", "--hidden", "100"], "not a multiple of head dim 64"),
    (["--seq", "64", "--providers", "sdpa_fast"], "unknown provider"),
    (["--seq", "64", "--rep-ms", "0"], "--rep-ms"),
])
def test_bench_command_bad_input_exits_2(args, match):
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert match in result.output


def test_bench_command_unwritable_csv_exits_2(tmp_path, kernel_device):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["bench", "--seq", "16", "--head-dim", "16", "--dtype", "fp32", "--batch", "1",
                                      "--heads", "1", "--csv", str(blocker / "r.csv")])
    assert result.exit_code == 2
    assert "cannot write --csv" in result.output


def test_kernel_bench_module_prints_one_shape(capsys, kernel_device):
    args = ["--seq", "32", "--head-dim", "16", "--dtype", "fp32", "--batch", "1", "--heads", "2", "--causal",
            "--providers", "sdpa_math", "--rep-ms", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "B=1 H=2 N=32 D=16 float32 causal" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("flashtune", "sdpa_math"))]
    assert len(lines) == 2 and lines[1].split()[-1].endswith("x")  # the tuned speed-up over sdpa_math


def test_kernel_bench_module_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--head-dim", "48"])
    assert exc.value.code == 2
    assert "unsupported head dim 48" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_kernel_bench_module_needs_a_gpu_without_the_interpreter():
    env = repo_env(drop=("TRITON_INTERPRET",))
    done = subprocess.run([sys.executable, "-m", "flashtune.tuner.benchmarking.run", "--seq", "64"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr


def test_baselines_are_the_sdpa_providers():
    assert BASELINES == tuple(p.name for p in PROVIDERS if p.backend is not None)
