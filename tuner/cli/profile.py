"""`flashtune profile`: run the tuned kernel for one shape inside an NVTX range, and the ncu command that
captures exactly that launch.

It needs a CUDA GPU: the Triton interpreter has no NVTX ranges or CUDA events, so on a machine
without one the only thing it offers is `--dry-run`, which prints the command to run on a GPU
machine.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from typing import Any

import click

from .bench import bench_device, shape_options, use_database
from .common import CliError, db_option, echo_json, json_option, key_options, number

NO_GPU = ("profile needs a CUDA GPU (none is visible here); `flashtune profile --dry-run` with the same options "
          "prints the ncu command to run on a GPU machine")


def _profile_args(shape: Any, warmup_ms: float, db_url: str | None) -> list[str]:
    # The canonical form of this invocation, for ncu to re-run (without --run-ncu).
    return ["--seq", str(shape.seq_len), "--head-dim", str(shape.head_dim), "--dtype", shape.dtype,
            "--causal" if shape.causal else "--no-causal", "--batch", str(shape.batch), "--heads", str(shape.heads),
            "--warmup-ms", f"{warmup_ms:g}", *(["--db", db_url] if db_url else [])]


def _run_ncu(command: list[str], report: str, ncu: str) -> list[tuple[str, str]]:
    from ..benchmarking.ncu import import_command, parse_raw_csv, summarize

    click.echo(f"running: {shlex.join(command)}", err=True)
    captured = subprocess.run(command, capture_output=True, text=True)
    if captured.returncode != 0 or "==ERROR==" in captured.stdout + captured.stderr:
        tail = "\n".join((captured.stdout + captured.stderr).strip().splitlines()[-15:])
        raise click.ClickException(f"ncu failed (exit {captured.returncode}):\n{tail}")
    raw = subprocess.run(import_command(report, ncu=ncu), capture_output=True, text=True)
    kernels = parse_raw_csv(raw.stdout)
    if raw.returncode != 0 or not kernels:
        raise click.ClickException(f"ncu captured no {report}.ncu-rep kernel (is the NVTX range "
                                   f"recorded?): {(raw.stderr or raw.stdout).strip()[-500:]}")
    return summarize(kernels[0])


def _launch(shape: Any, warmup_ms: float, nvtx_range: str) -> dict[str, Any]:
    """Warm up for `warmup_ms` (at least one launch, which compiles), then one launch in the NVTX range."""
    import torch

    from ...kernel import attention, dispatch
    from ..benchmarking.run import make_inputs

    device = bench_device()
    q, k, v = make_inputs(shape, device)
    choice = dispatch.explain(q, k, v, is_causal=shape.causal)
    launches = 0
    with torch.no_grad():
        started = time.perf_counter()
        while launches == 0 or (time.perf_counter() - started) * 1e3 < warmup_ms:
            attention(q, k, v, is_causal=shape.causal)
            torch.cuda.synchronize(device)
            launches += 1
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.nvtx.range(nvtx_range):
            start.record()
            attention(q, k, v, is_causal=shape.causal)
            end.record()
        torch.cuda.synchronize(device)
    ms = start.elapsed_time(end)
    return {"config": str(choice.config), "source": choice.source, "warmup_launches": launches, "ms": ms,
            "tflops": shape.throughput(ms)}


@click.command("profile")
@key_options(many=False, seq_default="4096", head_dim_default="128", dtype_default="fp16", causal_default="no-causal")
@shape_options
@click.option("--warmup-ms", type=number(0, 60_000), default=25.0, show_default=True,
              help="Warm-up launches for this long, in ms, before the profiled one (at least one launch).")
@db_option
@click.option("--report", default="flashtune_profile", show_default=True,
              help="Nsight Compute report path (without .ncu-rep) in the printed command.")
@click.option("--run-ncu", is_flag=True, help="Run the ncu command now (ncu must be installed) and summarise it.")
@click.option("--dry-run", is_flag=True, help="Only print the ncu command (no GPU needed).")
@json_option
def profile(seq: int, head_dim: int, dtype: str, causal: bool, tokens: int, hidden: int, batch: int | None,
            heads: int | None, warmup_ms: float, db_url: str | None, report: str, run_ncu: bool, dry_run: bool,
            as_json: bool) -> None:
    """Run the tuned kernel for one shape inside an NVTX range and print the ncu command that captures it."""
    from ..benchmarking.ncu import KERNEL_NAME, NVTX_RANGE, find_ncu, ncu_command
    from ..benchmarking.run import bench_shape_for

    try:
        shape = bench_shape_for(seq, head_dim, dtype, causal, tokens=tokens, hidden=hidden, batch=batch, heads=heads)
    except ValueError as error:
        raise CliError(error) from None
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            raise CliError(NO_GPU)
    ncu = find_ncu() if run_ncu else None
    if run_ncu and ncu is None:
        raise CliError("--run-ncu: no ncu executable on PATH or under /usr/local/cuda*/bin or "
                       "/opt/nvidia/nsight-compute: install Nsight Compute, or run the printed command elsewhere")
    command = ncu_command(_profile_args(shape, warmup_ms, db_url), report=report, ncu=ncu or "ncu")
    result: dict[str, Any] = {"shape": str(shape), "ncu_command": command}
    if not dry_run:
        use_database(db_url)
        result.update(_launch(shape, warmup_ms, NVTX_RANGE))
        if not as_json:
            click.echo(f"{shape}: config {result['config']} ({result['source']})")
            click.echo(f"{result['warmup_launches']} warm-up launch(es), then 1 launch in NVTX range "
                       f"'{NVTX_RANGE}': {result['ms']:.4f} ms, {result['tflops']:.1f} TFLOP/s")
    if not as_json:
        click.echo(f"\nNsight Compute, capturing only the profiled {KERNEL_NAME} launch (inside NVTX range "
                   f"'{NVTX_RANGE}', at the GPU's own clocks):\n  {shlex.join(command)}")
    if run_ncu and ncu is not None:
        summary = _run_ncu(command, report, ncu)
        result["ncu"] = dict(summary)
        if not as_json:
            click.echo(f"\nNsight Compute report {report}.ncu-rep:")
            for label, value in summary:
                click.echo(f"  {label:<28} {value}")
    if as_json:
        echo_json(result)


def register(group: click.Group) -> None:
    """Add `profile` to the CLI group."""
    group.add_command(profile)
