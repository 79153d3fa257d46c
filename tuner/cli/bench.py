"""`flashtune bench | plot | profile | doctor`: measure the tuned kernel, draw it, profile it, check the setup.

Bad input (ranges, sizes, a CSV that is empty or malformed, a key with no trials, a directory or
file that cannot be written, an unusable database) prints one line on stderr and exits with code 2
before any GPU work. torch is imported inside the commands that need it.
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import click

from .db import CliError
from .tune import MASK_MODES, parse_option


def _render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table; the last column is left ragged (it holds free text)."""
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers) - 1)]
    lines = []
    for row in [list(headers), ["-" * w for w in widths] + ["-" * len(headers[-1])], *rows]:
        lines.append(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]).rstrip())
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shape_options(func: Any) -> Any:
    for option in reversed((
        click.option("--tokens", type=int, default=16384, show_default=True,
                     help="Tokens per call, B·N: the batch is tokens // N (at least 1)."),
        click.option("--hidden", type=int, default=2048, show_default=True,
                     help="H·D: the head count is hidden // D."),
        click.option("--batch", type=int, default=None, help="Fixed batch size (overrides --tokens)."),
        click.option("--heads", type=int, default=None, help="Fixed head count (overrides --hidden)."),
    )):
        func = option(func)
    return func


def _mode_options(func: Any) -> Any:
    func = click.option("--both", "mode", flag_value="both", default=True,
                        help="Causal and non-causal (default).")(func)
    func = click.option("--no-causal", "mode", flag_value="full", help="Non-causal only.")(func)
    return click.option("--causal", "mode", flag_value="causal", help="Causal only.")(func)


def _device() -> Any:
    from ..benchmarking.run import bench_device

    try:
        return bench_device()
    except RuntimeError as error:
        raise CliError(str(error)) from None


# --- bench -------------------------------------------------------------------------------------

def _sweep_table(rows: Sequence[Any]) -> list[str]:
    from ..benchmarking.results import BASELINES, TUNED

    short = {b: b.removeprefix("sdpa_") for b in BASELINES}
    headers = ["provider", "B", "H", "N", "D", "dtype", "causal", "ms", "TFLOP/s",
               *(f"vs {short[b]}" for b in BASELINES), "max abs", "rel err", "peak MiB", "note"]
    table = []
    for r in rows:
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        note = (r.note if r.provider == TUNED else "") if r.status == "ok" else f"{r.status}: {r.note}"
        table.append([r.provider, str(r.batch), str(r.heads), str(r.seq_len), str(r.head_dim), r.dtype,
                      "yes" if r.causal else "no", _num(r.median_ms, ".4f"), _num(r.tflops, ".1f"),
                      *(_num(r.speedups.get(b), ".2f") for b in BASELINES),
                      _num(r.max_abs_err, ".1e"), _num(r.rel_err, ".1e"), _num(mem, ".0f"), note])
    return _render(headers, table)


def _geomeans(rows: Sequence[Any]) -> dict[str, tuple[float, int]]:
    from ..benchmarking.results import BASELINES, TUNED

    out = {}
    for b in BASELINES:
        values = [r.speedups[b] for r in rows if r.provider == TUNED and b in r.speedups]
        if values:
            out[b] = (math.exp(sum(map(math.log, values)) / len(values)), len(values))
    return out


class _Progress:
    """A bar with an ETA on a terminal; one line per shape on stderr otherwise (logs)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.bar = (click.progressbar(length=total, label="bench", file=sys.stderr, show_eta=True,
                                      show_pos=True) if sys.stderr.isatty() else None)
        if self.bar is not None:
            self.bar.__enter__()

    def shape_done(self, shape: Any, rows: Sequence[Any]) -> None:
        from ..benchmarking.results import TUNED

        self.done += 1
        if self.bar is not None:
            self.bar.label = str(shape)
            self.bar.update(1)
            return
        tuned = next((r for r in rows if r.provider == TUNED), None)
        what = (f"flashtune {tuned.median_ms:.4f} ms, {tuned.tflops:.1f} TFLOP/s" if tuned is not None
                and tuned.status == "ok" else f"flashtune {tuned.status if tuned else 'not run'}")
        click.echo(f"[{self.done}/{self.total}] {shape}: {what} ({time.monotonic() - self.started:.0f} s)",
                   err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _open_csv(path: Path) -> Any:
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot write --csv {path}: {error.strerror or error}") from None


@click.command("bench")
@click.option("--seq", "seq_text", default="128..16384", show_default=True,
              help="Sequence lengths: A..B doubles, A..B:S steps by S, comma lists as given.")
@click.option("--head-dim", "head_dim_text", default="64,128", show_default=True, help="Comma list of head dims.")
@click.option("--dtype", "dtype_text", default="fp16,bf16", show_default=True, help="Comma list: fp16, bf16, fp32.")
@_mode_options
@_shape_options
@click.option("--providers", default=None,
              help="Comma list of flashtune, sdpa_math, sdpa_flash, sdpa_efficient, sdpa_cudnn (default: all).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every row to this CSV file (written as each shape finishes).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of the table.")
@click.option("--warmup-ms", type=float, default=25.0, show_default=True, help="do_bench warm-up budget.")
@click.option("--rep-ms", type=float, default=100.0, show_default=True, help="do_bench repetition budget.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def bench(seq_text: str, head_dim_text: str, dtype_text: str, mode: str, tokens: int, hidden: int,
          batch: int | None, heads: int | None, providers: str | None, csv_path: Path | None, as_json: bool,
          warmup_ms: float, rep_ms: float, seed: int) -> None:
    """Time the tuned kernel (through the dispatcher) against torch SDPA's backends over a sweep."""
    from ..ranges import parse_dtypes, parse_head_dims, parse_seq_lens

    seqs = parse_option(parse_seq_lens, seq_text, "--seq")
    dims = parse_option(parse_head_dims, head_dim_text, "--head-dim")
    dtypes = parse_option(parse_dtypes, dtype_text, "--dtype")
    if not (warmup_ms >= 0 and rep_ms > 0):
        raise CliError(f"--warmup-ms must be >= 0 and --rep-ms above 0, got {warmup_ms} and {rep_ms}")
    from ..benchmarking.run import bench_shape, bench_shape_for, default_timer
    from ..benchmarking.results import CsvWriter
    from ..benchmarking.providers import select_providers

    try:
        chosen = select_providers(providers)
        shapes = [bench_shape_for(n, d, dt, c, tokens=tokens, hidden=hidden, batch=batch, heads=heads)
                  for d in dims for dt in dtypes for c in MASK_MODES[mode if isinstance(mode, str) else "both"] for n in seqs]
    except ValueError as error:
        raise CliError(str(error)) from None
    device = _device()
    stream = _open_csv(csv_path) if csv_path is not None else None
    writer = CsvWriter(stream) if stream is not None else None
    timer = default_timer(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    rows: list[Any] = []
    progress = _Progress(len(shapes))
    interrupted = False
    try:
        for shape in shapes:
            shape_rows = bench_shape(shape, device, providers=chosen, timer=timer, seed=seed)
            rows += shape_rows
            if writer is not None:
                writer.write(shape_rows)
            progress.shape_done(shape, shape_rows)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        if stream is not None:
            stream.close()
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        for line in _sweep_table(rows):
            click.echo(line)
        for baseline, (mean, count) in _geomeans(rows).items():
            click.echo(f"flashtune vs {baseline}: geomean speed-up {mean:.2f}x over {count} shape(s)")
    if csv_path is not None:
        click.echo(f"wrote {len(rows)} rows to {csv_path}", err=True)
    if interrupted:
        click.echo(f"interrupted after {progress.done} of {len(shapes)} shapes", err=True)
        sys.exit(130)


# --- plot --------------------------------------------------------------------------------------

def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise CliError(f"cannot write to --out {path}: {error.strerror or error}") from None
    return path


def _heatmap(out: Path, db_url: str | None, arch: str | None, seq: int | None, head_dim: int | None,
             dtype: str | None, causal: bool, kernel_version: str) -> Path:
    from ...db.store import Store, StoreError
    from ...db.types import Key

    missing = [name for name, value in (("--arch", arch), ("--seq", seq), ("--head-dim", head_dim),
                                        ("--dtype", dtype)) if value is None]
    if missing:
        raise CliError(f"--heatmap needs {', '.join(missing)} (the key whose trials to draw)")
    try:
        key = Key(arch, "fwd", seq, head_dim, dtype, causal)
    except ValueError as error:
        raise CliError(str(error)) from None
    from ...kernel.version import KERNEL_VERSION

    version = KERNEL_VERSION if kernel_version == "current" else kernel_version
    try:
        with Store.open(db_url, create=False) as store:
            where = store.display_url
            trials = store.trials(key) if version == "any" else store.trials(key, kernel_version=version)
            others = 0 if trials or version == "any" else len(store.trials(key))
    except StoreError as error:
        raise CliError(" ".join(str(error).split())) from None
    if not any(t.outcome == "ok" for t in trials):
        what = "no trials" if not trials else f"no successful trial among {len(trials)}"
        hint = (f"; {others} trial(s) of other kernel versions: pass --kernel-version any" if others
                else "; run `tune` for it, or check `flashtune show`")
        scope = "" if version == "any" else f" with kernel version {version}"
        raise CliError(f"{what} for {key}{scope} in {where}{hint}")
    from ..benchmarking.plots import PlotDependencyError, heatmap_figure

    _writable_dir(out)
    try:
        return heatmap_figure(trials, key, out)
    except PlotDependencyError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise CliError(f"cannot write to --out {out}: {error.strerror or error}") from None


@click.command("plot")
@click.argument("csv_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("plots"),
              show_default=True, help="Directory for the PNG files (created if missing).")
@click.option("--heatmap", is_flag=True, help="Draw a BLOCK_M × BLOCK_N heatmap of one key's trials instead.")
@click.option("--arch", default=None, help="Heatmap: the key's arch, e.g. sm_90.")
@click.option("--seq", type=int, default=None, help="Heatmap: the key's sequence length.")
@click.option("--head-dim", type=int, default=None, help="Heatmap: the key's head dim.")
@click.option("--dtype", default=None, help="Heatmap: the key's dtype (fp16, bf16, fp32).")
@click.option("--causal/--no-causal", default=False, show_default=True, help="Heatmap: causal key or not.")
@click.option("--kernel-version", default="current", show_default=True,
              help="Heatmap: trials of this kernel version; 'current' is this checkout's, 'any' all.")
@click.option("--db", "db_url", default=None, metavar="URL", help="Heatmap: database URL (default: $FLASHTUNE_DB or the user file).")
def plot(csv_file: Path | None, out_dir: Path, heatmap: bool, arch: str | None, seq: int | None,
         head_dim: int | None, dtype: str | None, causal: bool, kernel_version: str, db_url: str | None) -> None:
    """Plot a `flashtune bench --csv` file against N, or (--heatmap) one key's tuning trials."""
    if heatmap:
        if csv_file is not None:
            raise CliError("give either a CSV file or --heatmap, not both")
        click.echo(_heatmap(out_dir, db_url, arch, seq, head_dim, dtype, causal, kernel_version))
        return
    if csv_file is None:
        raise CliError("give the CSV written by `flashtune bench --csv FILE`, or --heatmap with a key")
    from ..benchmarking.results import read_csv

    from ..benchmarking.plots import PlotDependencyError, sweep_figures

    try:
        rows = read_csv(csv_file)
    except OSError as error:
        raise CliError(f"cannot read {csv_file}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CliError(str(error)) from None
    _writable_dir(out_dir)
    try:
        written = sweep_figures(rows, out_dir)
    except PlotDependencyError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:
        raise CliError(f"{csv_file}: {error}") from None
    except OSError as error:
        raise CliError(f"cannot write to --out {out_dir}: {error.strerror or error}") from None
    for path in written:
        click.echo(path)


# --- profile -----------------------------------------------------------------------------------

def _profile_args(seq: int, head_dim: int, dtype: str, causal: bool, shape: Any, warmup: int) -> list[str]:
    # The canonical form of this invocation, for ncu to re-run (without --run-ncu).
    return ["--seq", str(seq), "--head-dim", str(head_dim), "--dtype", dtype, *(["--causal"] if causal else []),
            "--batch", str(shape.batch), "--heads", str(shape.heads), "--warmup", str(warmup)]


def _run_ncu(command: list[str], report: str, ncu: str) -> None:
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
    click.echo(f"\nNsight Compute report {report}.ncu-rep ({len(kernels)} kernel):")
    for label, value in summarize(kernels[0]):
        click.echo(f"  {label:<28} {value}")


@click.command("profile")
@click.option("--seq", type=int, default=4096, show_default=True, help="Sequence length N.")
@click.option("--head-dim", type=int, default=128, show_default=True, help="Head dim D.")
@click.option("--dtype", default="fp16", show_default=True, help="fp16, bf16 or fp32.")
@click.option("--causal", is_flag=True, help="Causal attention.")
@_shape_options
@click.option("--warmup", type=int, default=10, show_default=True, help="Launches before the profiled one.")
@click.option("--report", default="flashtune_profile", show_default=True,
              help="Nsight Compute report path (without .ncu-rep) in the printed command.")
@click.option("--run-ncu", is_flag=True, help="Run the ncu command now (ncu must be installed) and summarise it.")
@click.option("--dry-run", is_flag=True, help="Only print the ncu command (no GPU needed).")
def profile(seq: int, head_dim: int, dtype: str, causal: bool, tokens: int, hidden: int, batch: int | None,
            heads: int | None, warmup: int, report: str, run_ncu: bool, dry_run: bool) -> None:
    """Run the tuned kernel for one shape inside an NVTX range and print the ncu command that captures it."""
    from ...db.types import normalize_dtype

    from ..benchmarking.ncu import KERNEL_NAME, NVTX_RANGE, find_ncu, ncu_command

    if warmup < 0:
        raise CliError(f"--warmup must be at least 0, got {warmup}")
    try:
        dtype = normalize_dtype(dtype)
        from ..benchmarking.run import bench_shape_for

        shape = bench_shape_for(seq, head_dim, dtype, causal, tokens=tokens, hidden=hidden, batch=batch,
                                heads=heads)
    except ValueError as error:
        raise CliError(str(error)) from None
    ncu = find_ncu() if run_ncu else None
    if run_ncu and ncu is None:
        raise CliError("--run-ncu: no ncu executable on PATH or under /usr/local/cuda*/bin or "
                       "/opt/nvidia/nsight-compute: install Nsight Compute, or run the printed command elsewhere")
    command = ncu_command(_profile_args(seq, head_dim, dtype, causal, shape, warmup), report=report,
                          ncu=ncu or "ncu")
    if not dry_run:
        _profile_launch(shape, warmup, NVTX_RANGE)
    click.echo(f"\nNsight Compute, capturing only the profiled {KERNEL_NAME} launch (inside NVTX range "
               f"'{NVTX_RANGE}', at the GPU's own clocks):\n  {shlex.join(command)}")
    if run_ncu and ncu is not None:
        _run_ncu(command, report, ncu)


def _profile_launch(shape: Any, warmup: int, nvtx_range: str) -> None:
    import torch

    from ...kernel import attention, dispatch
    from ..benchmarking.run import make_inputs

    device = _device()
    if device.type != "cuda":
        raise CliError("profile needs a CUDA GPU (none is visible); --dry-run prints the ncu command anyway")
    q, k, v = make_inputs(shape, device)
    choice = dispatch.explain(q, k, v, is_causal=shape.causal)
    with torch.no_grad():
        for _ in range(warmup):
            attention(q, k, v, is_causal=shape.causal)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.nvtx.range(nvtx_range):
            start.record()
            attention(q, k, v, is_causal=shape.causal)
            end.record()
        torch.cuda.synchronize(device)
    ms = start.elapsed_time(end)
    click.echo(f"{shape}: config {choice}")
    click.echo(f"{warmup} warm-up launches, then 1 launch in NVTX range '{nvtx_range}': {ms:.4f} ms, "
               f"{shape.throughput(ms):.1f} TFLOP/s")


# --- doctor ------------------------------------------------------------------------------------

@click.command("doctor")
@click.option("--db", "db_url", default=None, metavar="URL", help="Database URL (default: $FLASHTUNE_DB or the user file).")
@click.option("--no-run", is_flag=True, help="Skip the test call of the kernel.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(db_url: str | None, no_run: bool, as_json: bool) -> None:
    """Check the setup: GPUs, versions, the database, the dispatcher and one kernel call. Exit 1 if broken."""
    from ...db.paths import parse_url

    if db_url is not None:
        backend = parse_option(parse_url, db_url, "--db").get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise CliError(f"--db: unsupported database URL {db_url!r}: expected sqlite:///PATH or "
                           "postgresql+psycopg://USER@HOST[:PORT]/DBNAME")
    from ..doctor import diagnose

    findings = diagnose(db_url, run_kernel=not no_run)
    failed = [f for f in findings if f.level == "fail"]
    if as_json:
        click.echo(json.dumps({"healthy": not failed, "findings": [asdict(f) for f in findings]}, indent=1))
    else:
        for f in findings:
            click.echo(f"[{f.level.upper():>4}] {f.topic}: {f.message}")
        click.echo("healthy" if not failed else
                   f"{len(failed)} problem(s): " + "; ".join(f"{f.topic}: {f.message}" for f in failed))
    if failed:
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add this module's commands to the CLI group."""
    for command in (bench, plot, profile, doctor):
        group.add_command(command)
