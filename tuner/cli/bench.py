"""`flashtune bench`: time the tuned kernel against torch SDPA's backends over a sweep of shapes (one shape
is a sweep of one).

Bad input (ranges, sizes, providers, a CSV target that cannot be written, an unusable database)
prints one line on stderr and exits with code 2 before any GPU work. torch is imported inside the
command body.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any, Callable, Sequence, TypeVar

import click

from .common import (CliError, Progress, count, db_option, echo_json, echo_table, fmt_num, geomean, json_option,
                     key_options, number)
from .output import open_for_writing

F = TypeVar("F", bound=Callable[..., Any])


def shape_options(func: F) -> F:
    """`--tokens`, `--hidden`, `--batch`, `--heads`: the batch and head count of each benchmarked shape."""
    for option in reversed((
        click.option("--tokens", type=count(), default=16384, show_default=True,
                     help="Tokens per call, B·N: the batch is tokens // N (at least 1)."),
        click.option("--hidden", type=count(), default=2048, show_default=True,
                     help="H·D: the head count is hidden // D."),
        click.option("--batch", type=count(), default=None, help="Fixed batch size (overrides --tokens)."),
        click.option("--heads", type=count(), default=None, help="Fixed head count (overrides --hidden)."),
    )):
        func = option(func)
    return func


def use_database(db_url: str | None) -> None:
    """Point the dispatcher at `db_url` (when given) for the kernel calls that follow; CliError when it
    cannot be read, so a benchmark never silently runs on default configs."""
    if db_url is None:
        return
    from ...db.errors import StoreError
    from ...db.store import Store
    from ...kernel import dispatch

    try:
        with Store.open(db_url, create=False):
            pass
    except (StoreError, ValueError) as error:
        raise CliError(error) from None
    dispatch.reload(db_url)


def bench_device() -> Any:
    """The device the benchmark runs on, or CliError saying what is missing."""
    from ..benchmarking.run import bench_device as device

    try:
        return device()
    except RuntimeError as error:
        raise CliError(error) from None


def _table(rows: Sequence[Any]) -> None:
    from ..benchmarking.results import BASELINES, TUNED

    short = {b: b.removeprefix("sdpa_") for b in BASELINES}
    speedups = [f"vs {short[b]}" for b in BASELINES]
    headers = ["provider", "B", "H", "N", "D", "dtype", "causal", "ms", "TFLOP/s", *speedups,
               "max abs", "rel err", "peak MiB", "note"]
    table = []
    for r in rows:
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        note = (r.note if r.provider == TUNED else "") if r.status == "ok" else f"{r.status}: {r.note}"
        table.append([r.provider, str(r.batch), str(r.heads), str(r.seq_len), str(r.head_dim), r.dtype,
                      "yes" if r.causal else "no", fmt_num(r.median_ms, ".4f"), fmt_num(r.tflops, ".1f"),
                      *(fmt_num(r.speedups.get(b), ".2f") for b in BASELINES),
                      fmt_num(r.max_abs_err, ".1e"), fmt_num(r.rel_err, ".1e"), fmt_num(mem, ".0f"), note])
    echo_table(headers, table, right=["B", "H", "N", "D", "ms", "TFLOP/s", *speedups, "max abs", "rel err",
                                      "peak MiB"])
    for b in BASELINES:
        values = [r.speedups[b] for r in rows if r.provider == TUNED and b in r.speedups]
        if values:
            click.echo(f"flashtune vs {b}: geomean speed-up {geomean(values):.2f}x over {len(values)} shape(s)")


def _progress_line(shape: Any, rows: Sequence[Any]) -> str:
    from ..benchmarking.results import TUNED

    tuned = next((r for r in rows if r.provider == TUNED), None)
    if tuned is not None and tuned.status == "ok":
        return f"{shape}: flashtune {tuned.median_ms:.4f} ms, {tuned.tflops:.1f} TFLOP/s"
    return f"{shape}: flashtune {tuned.status if tuned else 'not run'}"


@click.command("bench")
@key_options(many=True, seq_default="128..16384", head_dim_default="64,128", dtype_default="fp16,bf16")
@shape_options
@click.option("--providers", default=None,
              help="Comma list of flashtune, sdpa_math, sdpa_flash, sdpa_efficient, sdpa_cudnn (default: all).")
@db_option
@click.option("--csv", "csv_path", default=None, metavar="FILE",
              help="Also write every row to this CSV file (written as each shape finishes).")
@json_option
@click.option("--warmup-ms", type=number(0, 60_000), default=25.0, show_default=True,
              help="Warm-up before timing, in ms (do_bench's budget).")
@click.option("--rep-ms", type=number(0, 600_000, low_open=True), default=100.0, show_default=True,
              help="Timed repetitions, in ms (do_bench's budget).")
@click.option("--seed", type=count(0), default=0, show_default=True, help="Seed of the random inputs.")
def bench(seq: list[int], head_dim: list[int], dtype: list[str], causal: tuple[bool, ...], tokens: int, hidden: int,
          batch: int | None, heads: int | None, providers: str | None, db_url: str | None, csv_path: str | None,
          as_json: bool, warmup_ms: float, rep_ms: float, seed: int) -> None:
    """Time the tuned kernel (through the dispatcher) against torch SDPA's backends over a sweep.

    One shape is a sweep of one: `flashtune bench --seq 1024 --head-dim 64 --dtype fp16 --causal`.
    Exit code 1 when the tuned kernel failed on a shape.
    """
    from ..benchmarking.providers import select_providers
    from ..benchmarking.results import TUNED, CsvWriter
    from ..benchmarking.run import bench_shape, bench_shape_for, default_timer, gpu_name

    try:
        chosen = select_providers(providers)
    except ValueError as error:
        raise CliError(f"--providers: {error}") from None
    try:
        shapes = [bench_shape_for(n, d, dt, c, tokens=tokens, hidden=hidden, batch=batch, heads=heads)
                  for d in head_dim for dt in dtype for c in causal for n in seq]
    except ValueError as error:
        raise CliError(error) from None
    device = bench_device()
    use_database(db_url)
    stream = open_for_writing(csv_path, "--csv") if csv_path is not None else None
    writer = CsvWriter(stream) if stream is not None else None
    timer = default_timer(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    rows: list[Any] = []
    interrupted = False
    with Progress("bench", len(shapes), items=len(shapes)) as progress:
        try:
            for shape in shapes:
                shape_rows = bench_shape(shape, device, providers=chosen, timer=timer, seed=seed)
                rows += shape_rows
                if writer is not None:
                    writer.write(shape_rows)
                progress.advance(1, str(shape))
                progress.item_done(_progress_line(shape, shape_rows))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if stream is not None:
                stream.close()
    if as_json:
        echo_json([asdict(r) for r in rows])
    else:
        from ...kernel.version import op_version

        click.echo(f"on {gpu_name(device)}, fwd kernel version {op_version('fwd')}; errors against an fp32 reference")
        _table(rows)
    if csv_path is not None:
        click.echo(f"wrote {len(rows)} rows to {csv_path}", err=True)
    if interrupted:
        click.echo(f"interrupted after {progress.finished_items} of {len(shapes)} shapes", err=True)
        sys.exit(130)
    if any(r.provider == TUNED and r.status == "error" for r in rows):
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add `bench` to the CLI group."""
    group.add_command(bench)
