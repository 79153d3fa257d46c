"""The `tune` command: tune keys on the GPU present and store every trial and winner, or plan with --dry-run.

Bad input (ranges, head dims, dtypes, budget, an --arch other than the GPU's, no GPU, an unusable
database) prints one line on stderr and exits with code 2 before anything is written. Ctrl-C stops
after the trial in flight (exit code 130); `--budget` stops the same way (exit code 0); running the
same command again resumes.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import click

from ...db.types import Key

from .common import (ARCH, DURATION, CliError, Progress, count, db_option, echo_json, echo_table, fmt_num, geomean,
                     json_option, key_options)


def _dry_run(arch: str | None, head_dims: Sequence[int], dtypes: Sequence[str], keys_count: int,
             as_json: bool) -> None:
    from ..gpu import NoGpuError, detect_gpu, planned_gpu
    from ..space import plan

    try:
        here = detect_gpu()
    except NoGpuError:
        here = None
    if arch is None:
        if here is None:
            raise CliError("no GPU here: give --arch (e.g. --arch sm_86) to plan with --dry-run")
        gpu = here
    else:
        gpu = here if here is not None and here.arch == arch else planned_gpu(arch)
    groups = []
    for head_dim in head_dims:
        for dtype in dtypes:
            entries = plan(head_dim, dtype, gpu.smem_limit, arch=gpu.arch)
            over = sum(1 for c in entries if c.dropped_by and c.dropped_by.startswith("smem"))
            kept = [{"config": str(c.config), "smem": c.smem} for c in entries if c.kept]
            groups.append({"head_dim": head_dim, "dtype": dtype, "configs": kept, "space": len(entries),
                           "dropped_smem": over, "dropped_other": len(entries) - len(kept) - over})
    if as_json:
        echo_json({"arch": gpu.arch, "gpu": gpu.name, "smem_limit": gpu.smem_limit, "keys": keys_count,
                   "groups": groups})
        return
    click.echo(f"{gpu.arch} ({gpu.name}), shared memory limit {gpu.smem_limit // 1024} KB per block; "
               f"{keys_count} keys")
    for g in groups:
        click.echo(f"\nD={g['head_dim']} {g['dtype']}: {len(g['configs'])} of {g['space']} configs kept "
                   f"({g['dropped_smem']} over the shared-memory limit, {g['dropped_other']} by tile rules)")
        echo_table(["config", "smem KB"], [[c["config"], f"{c['smem'] / 1024:.1f}"] for c in g["configs"]],
                   right=["smem KB"])


class _TuneProgress:
    """The tuning loop's progress events (tuner.loop.Progress) on the shared bar: trials are its units,
    and each finished key is a line in a log."""

    def __init__(self, keys: int) -> None:
        self._keys = keys
        self._bar: Progress | None = None

    def start(self, total: int) -> None:
        self._bar = Progress("tuning", total, items=self._keys)

    def advance(self, key: Key, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(n, str(key))

    def key_done(self, result: Any) -> None:
        if self._bar is not None:
            w = result.winner
            best = f"{w.config} {w.median_ms:.3f} ms" if w is not None else "no winner"
            self._bar.item_done(f"{result.key}: {best}; {result.new_trials} new, {result.skipped} stored")

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _summary(results: Sequence[Any]) -> dict[str, Any]:
    rows = []
    for r in results:
        w = r.winner
        rows.append({"key": str(r.key), "seq_len": r.key.seq_len, "head_dim": r.key.head_dim,
                     "dtype": r.key.dtype, "causal": r.key.causal, "batch_heads": r.batch_heads,
                     "winner": str(w.config) if w else None, "median_ms": w.median_ms if w else None,
                     "tflops": w.tflops if w else None, "default": str(r.default_config),
                     "default_ms": r.default_ms, "speedup": r.speedup, "new_trials": r.new_trials,
                     "skipped": r.skipped, "complete": r.complete, "winner_stored": r.winner_stored,
                     "outcomes": r.outcomes})
    return {"keys": rows, "geomean_speedup": geomean(r["speedup"] for r in rows)}


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [[r["key"] + ("" if r["complete"] else " (partial)"), r["winner"] or "-", fmt_num(r["median_ms"], ".4f"),
             fmt_num(r["tflops"], ".1f"), r["default"], fmt_num(r["speedup"], ".2f")]
            for r in summary["keys"]]
    echo_table(["key", "winner", "ms", "TFLOP/s", "default", "speed-up"], rows, right=["ms", "TFLOP/s", "speed-up"])
    if summary["geomean_speedup"]:
        click.echo(f"geomean speed-up over the default config: {summary['geomean_speedup']:.2f}x")


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashtune")
@click.option("--arch", type=ARCH, default=None, help="GPU arch (sm_86, sm_90, ...); must be the GPU's unless --dry-run.")
@key_options(many=True, seq_default="128..4096", head_dim_default="64,128", dtype_default="fp16,bf16")
@click.option("--batch-heads", type=count(), default=None, help="B·H of the benchmark inputs (default: enough to fill the GPU).")
@db_option
@click.option("--budget", type=DURATION, default=None, help="Stop cleanly after this long (90s, 10m, 1h); run again to resume.")
@click.option("--dry-run", is_flag=True, help="List the space and the estimated shared memory; no GPU needed.")
@json_option
@click.option("--compile-threads", type=count(1, 256), default=None,
              help="Configs compiled at once (default: CPU cores, at most 16).")
@click.option("--trial-timeout", type=DURATION, default="180s", show_default=True,
              help="A trial silent for this long is recorded as timeout.")
def tune(arch: str | None, seq: list[int], head_dim: list[int], dtype: list[str], causal: tuple[bool, ...],
         batch_heads: int | None, db_url: str | None, budget: float | None, dry_run: bool, as_json: bool,
         compile_threads: int | None, trial_timeout: float) -> None:
    """Find the fastest correct launch config per key on this GPU and store it."""
    if dry_run:
        _dry_run(arch, head_dim, dtype, len(seq) * len(head_dim) * len(dtype) * len(causal), as_json)
        return
    args = {"seq": seq, "head_dim": head_dim, "dtype": dtype, "causal": list(causal), "batch_heads": batch_heads,
            "budget_s": budget}
    _tune(arch, seq, head_dim, dtype, causal, batch_heads, db_url, budget, trial_timeout,
          compile_threads or min(16, os.cpu_count() or 1), as_json, args)


def _tune(arch: str | None, seqs: Sequence[int], head_dims: Sequence[int], dtypes: Sequence[str],
          causals: Sequence[bool], batch_heads: int | None, db_url: str | None, budget: float | None,
          trial_timeout: float, threads: int, as_json: bool, args: dict[str, Any]) -> None:
    from ...db.errors import StoreError

    from ..loop import TuneSettings
    from ..session import SessionError, session_gpu, tuning_session
    from ..worker import WorkerError

    stop = {"requested": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        click.echo("\nstopping after the trial in flight (Ctrl-C again to abort now)", err=True)

    started = time.monotonic()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        gpu = session_gpu(arch)
        keys = [Key(gpu.arch, "fwd", n, d, dt, c) for d in head_dims for dt in dtypes for c in causals for n in seqs]
        with tuning_session(db_url, args, gpu=gpu, compile_threads=threads, trial_timeout_s=trial_timeout) as session:
            results = session.tune(keys, batch_heads=(lambda k: batch_heads) if batch_heads else None,
                                   settings=TuneSettings(budget_s=budget), progress=_TuneProgress(len(keys)),
                                   should_stop=lambda: stop["requested"])
    except (SessionError, WorkerError, StoreError, ValueError) as error:
        raise CliError(error) from None
    except KeyboardInterrupt:
        click.echo("aborted; the trials measured so far are stored: run the same command again to resume", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    if session.finish_error:
        click.echo(session.finish_error, err=True)
    summary = _summary(results)
    summary.update(run_id=session.run_id, status=session.status, elapsed_s=round(time.monotonic() - started, 1),
                   worker_restarts=getattr(session.bench, "restarts", 0), gpu=asdict(session.gpu),
                   keys_planned=len(keys))
    if as_json:
        echo_json(summary)
    else:
        _print_summary(summary)
        if session.status != "done":
            click.echo(f"stopped ({session.status}) after {len(results)} of {len(keys)} keys; "
                       "run the same command again to resume", err=True)
    if session.status == "interrupted":
        sys.exit(130)


def register(group: click.Group) -> None:
    """Add `tune` to the CLI group."""
    group.add_command(tune)
