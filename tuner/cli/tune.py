"""The `tune` command: tune keys on the GPU present and store every trial and winner, or plan with --dry-run.

Bad input (ranges, head dims, dtypes, budget, an --arch other than the GPU's, no GPU, an unusable
database) prints one line on stderr and exits with code 2 before anything is written. Ctrl-C stops
after the trial in flight (exit code 130); `--budget` stops the same way (exit code 0); running the
same command again resumes.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import click

from ...db.arch import normalize_arch
from ...db.store import Store, StoreError
from ...db.types import Key

from .db import CliError

# --causal / --no-causal / --both: which masks a command covers.
MASK_MODES = {"causal": (True,), "full": (False,), "both": (False, True)}


def parse_option(func: Any, text: str, option: str) -> Any:
    """`func(text)`, its ValueError turned into the CLI's one-line error naming `option`."""
    try:
        return func(text)
    except ValueError as error:
        raise CliError(f"{option}: {error}") from None


def _positive_int(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"{name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise CliError(f"{name} must be at least 1, got {value}")
    return value


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _CliProgress:
    """A bar with an ETA on a terminal; one line per key (with the ETA) otherwise, e.g. in a log."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar: Any = None
        self._total = 0
        self._done = 0
        self._keys = 0
        self._started = time.monotonic()

    def start(self, total: int) -> None:
        self._total, self._started = max(total, 1), time.monotonic()
        if self._tty:
            self._bar = click.progressbar(length=self._total, label="tuning", file=sys.stderr,
                                          show_eta=True, show_pos=True)
            self._bar.__enter__()

    def advance(self, key: Key, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.label = str(key)
            self._bar.update(n)

    def _eta(self) -> str:
        elapsed = time.monotonic() - self._started
        left = max(self._total - self._done, 0)
        return _fmt_s(elapsed / self._done * left) if self._done else "?"

    def key_done(self, result: Any) -> None:
        self._keys += 1
        if self._bar is None:
            w = result.winner
            best = f"{w.config} {w.median_ms:.3f} ms" if w is not None else "no winner"
            click.echo(f"[{self._keys}] {result.key}: {best}; {result.new_trials} new, {result.skipped} stored; "
                       f"elapsed {_fmt_s(time.monotonic() - self._started)}, ETA {self._eta()}", err=True)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


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
        click.echo(json.dumps({"arch": gpu.arch, "gpu": gpu.name, "smem_limit": gpu.smem_limit,
                               "keys": keys_count, "groups": groups}, indent=2))
        return
    click.echo(f"{gpu.arch} ({gpu.name}), shared memory limit {gpu.smem_limit // 1024} KB per block; "
               f"{keys_count} keys")
    for g in groups:
        click.echo(f"\nD={g['head_dim']} {g['dtype']}: {len(g['configs'])} of {g['space']} configs kept "
                   f"({g['dropped_smem']} over the shared-memory limit, {g['dropped_other']} by tile rules)")
        click.echo(f"  {'config':<20} {'smem KB':>8}")
        for c in g["configs"]:
            click.echo(f"  {c['config']:<20} {c['smem'] / 1024:>8.1f}")


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
    speedups = [r["speedup"] for r in rows if r["speedup"]]
    geomean = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
    return {"keys": rows, "geomean_speedup": geomean}


def _print_table(summary: dict[str, Any]) -> None:
    header = f"{'key':<42} {'winner':<18} {'ms':>8} {'TFLOP/s':>8} {'default':<18} {'speed-up':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in summary["keys"]:
        ms = f"{r['median_ms']:.4f}" if r["median_ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        mark = "" if r["complete"] else " (partial)"
        click.echo(f"{r['key'] + mark:<42} {r['winner'] or '-':<18} {ms:>8} {tf:>8} {r['default']:<18} {sp:>8}")
    if summary["geomean_speedup"]:
        click.echo(f"geomean speed-up over the default config: {summary['geomean_speedup']:.2f}x")


@click.command("tune")
@click.option("--arch", default=None, help="GPU arch (sm_86, sm_90, ...); must be the GPU's unless --dry-run.")
@click.option("--seq", "seq_text", default="128..4096", show_default=True,
              help="Sequence lengths: A..B doubles, A..B:S steps by S, comma lists as given.")
@click.option("--head-dim", "head_dim_text", default="64,128", show_default=True, help="Comma list of head dims.")
@click.option("--dtype", "dtype_text", default="fp16,bf16", show_default=True, help="Comma list: fp16, bf16, fp32.")
@click.option("--causal", "mode", flag_value="causal", help="Causal keys only.")
@click.option("--no-causal", "mode", flag_value="full", help="Non-causal keys only.")
@click.option("--both", "mode", flag_value="both", default=True, help="Causal and non-causal keys (default).")
@click.option("--batch-heads", "batch_heads_text", default=None, metavar="N",
              help="B·H of the benchmark inputs (default: enough to fill the GPU).")
@click.option("--db", "db_url", default=None, metavar="URL", help="Database URL (default: $FLASHTUNE_DB or the user file).")
@click.option("--budget", "budget_text", default=None, metavar="TIME",
              help="Stop cleanly after this long (90s, 10m, 1h); run again to resume.")
@click.option("--dry-run", is_flag=True, help="List the space and the estimated shared memory; no GPU needed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--compile-threads", "threads_text", default=None, metavar="N",
              help="Configs compiled at once (default: CPU cores, at most 16).")
@click.option("--trial-timeout", "timeout_text", default="180s", show_default=True, metavar="TIME",
              help="A trial silent for this long is recorded as timeout.")
def tune(arch: str | None, seq_text: str, head_dim_text: str, dtype_text: str, mode: str,
         batch_heads_text: str | None, db_url: str | None, budget_text: str | None, dry_run: bool,
         as_json: bool, threads_text: str | None, timeout_text: str) -> None:
    """Find the fastest correct launch config per key on this GPU and store it."""

    from ..ranges import parse_dtypes, parse_duration, parse_head_dims, parse_seq_lens

    seq_lens = parse_option(parse_seq_lens, seq_text, "--seq")
    head_dims = parse_option(parse_head_dims, head_dim_text, "--head-dim")
    dtypes = parse_option(parse_dtypes, dtype_text, "--dtype")
    budget = parse_option(parse_duration, budget_text, "--budget") if budget_text is not None else None
    trial_timeout = parse_option(parse_duration, timeout_text, "--trial-timeout")
    batch_heads = _positive_int(batch_heads_text, "--batch-heads")
    threads = _positive_int(threads_text, "--compile-threads") or min(16, os.cpu_count() or 1)
    arch = parse_option(normalize_arch, arch, "--arch") if arch is not None else None
    causals = MASK_MODES[mode if isinstance(mode, str) else "both"]

    def keys_for(target: str) -> list[Key]:
        return [Key(target, "fwd", n, d, dt, c) for d in head_dims for dt in dtypes for c in causals
                for n in seq_lens]

    if dry_run:
        _dry_run(arch, head_dims, dtypes, len(seq_lens) * len(head_dims) * len(dtypes) * len(causals), as_json)
        return
    _tune(arch, keys_for, batch_heads, db_url, budget, trial_timeout, threads, as_json,
          {"seq": seq_text, "head_dim": head_dim_text, "dtype": dtype_text, "mode": mode,
           "batch_heads": batch_heads, "budget_s": budget})


def _tune(arch: str | None, keys_for: Any, batch_heads: int | None, db_url: str | None, budget: float | None,
          trial_timeout: float, threads: int, as_json: bool, args: dict[str, Any]) -> None:
    from ...kernel.defaults import default_config
    from ...kernel.version import KERNEL_VERSION

    from ..bench import fill_batch_heads
    from ..gpu import NoGpuError, detect_gpu, run_info
    from ..loop import Tuner, TuneSettings
    from ..space import candidates
    from ..worker import WorkerBench, WorkerError

    try:
        gpu = detect_gpu()
    except NoGpuError as error:
        raise CliError(str(error)) from None
    try:
        normalize_arch(gpu.arch)
    except ValueError as error:
        raise CliError(f"{gpu.name} is {gpu.arch}: {error}") from None
    if arch is not None and arch != gpu.arch:
        raise CliError(f"--arch {arch} differs from the GPU present, {gpu.name} ({gpu.arch}); "
                       "tune on that GPU, or plan with --dry-run")
    keys = keys_for(gpu.arch)
    try:
        store = Store.open(db_url)
    except (StoreError, ValueError) as error:  # unreachable, corrupt, or a malformed/unsupported URL
        raise CliError(" ".join(str(error).split())) from None
    space_cache: dict[tuple[int, str], list[Any]] = {}

    def space(key: Key) -> list[Any]:
        group = (key.head_dim, key.dtype)
        if group not in space_cache:
            space_cache[group] = candidates(key.head_dim, key.dtype, gpu.smem_limit, arch=gpu.arch)
        return space_cache[group]

    stop = {"requested": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        click.echo("\nstopping after the trial in flight (Ctrl-C again to abort now)", err=True)

    bench = WorkerBench(gpu.index, compile_threads=threads, trial_timeout_s=trial_timeout)
    previous = signal.signal(signal.SIGINT, on_sigint)
    started = time.monotonic()
    status = "failed"
    run_id: int | None = None
    try:
        try:
            run_id = store.start_run(run_info(gpu, args))
        except StoreError as error:
            raise CliError(" ".join(str(error).split())) from None
        tuner = Tuner(store, run_id, bench, kernel_version=KERNEL_VERSION, gpu_name=gpu.name, space=space,
                      default=lambda k: default_config(k.arch, k.head_dim, k.dtype, gpu.smem_limit),
                      batch_heads=lambda k: batch_heads or fill_batch_heads(k.seq_len, gpu.sm_count),
                      settings=TuneSettings(budget_s=budget), progress=_CliProgress(),
                      should_stop=lambda: stop["requested"])
        try:
            results = tuner.run(keys)
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except (WorkerError, StoreError) as error:
            raise CliError(" ".join(str(error).split())) from None
        status = tuner.stop_reason or "done"
    finally:
        if run_id is not None:
            try:
                store.finish_run(run_id, status)
            except StoreError as error:  # the run's trials are committed; only its end mark is lost
                click.echo(f"could not mark run {run_id} {status}: {' '.join(str(error).split())}", err=True)
        signal.signal(signal.SIGINT, previous)
        bench.close()
        store.close()
    summary = _summary(results)
    summary.update(run_id=run_id, status=status, elapsed_s=round(time.monotonic() - started, 1),
                   worker_restarts=getattr(bench, "restarts", 0), gpu=asdict(gpu), keys_planned=len(keys))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_table(summary)
        if status != "done":
            click.echo(f"stopped ({status}) after {len(results)} of {len(keys)} keys; "
                       "run the same command again to resume", err=True)
    if status == "interrupted":
        sys.exit(130)


def register(group: click.Group) -> None:
    """Add `tune` to the CLI group."""
    group.add_command(tune)
