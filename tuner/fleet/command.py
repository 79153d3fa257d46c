"""The `tune` command's fleet branch: `--gpus`, `--job NAME`, `--join NAME`.

Every form runs the same way: the keys are a job in the database (`flashtune.db.jobs`), and one
worker thread per GPU drives that GPU's benchmark worker process (`tuner.worker.WorkerBench`, inside a
tuning session with its own run record) through the claim loop of `tuner.fleet.worker`. `--gpus`
alone makes a job of its own per arch (GPUs of different archs tune their own arch's keys); `--job
NAME` names the job so that other hosts can `--join NAME` it through PostgreSQL. Bad input (a GPU
index this host lacks, `--join` on SQLite, a job of another arch or kernel version) is one line and
exit code 2 before anything is written.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import click

from ...db.errors import StoreError
from ...db.jobs import Job, JobError, JobQueue, Worker, check_job_name
from ...db.paths import default_url, sqlite_path
from ...db.text import mask_url
from ...db.store import Store
from ...db.types import Key
from ..cli.common import CliError
from .gpus import compile_share, select_gpus
from .units import claim_units
from .worker import WorkResult, work

DEFAULT_LEASE_S = 60.0
SQLITE_JOIN = ("--join: {url} is SQLite, and SQLite cannot share a queue across hosts; to tune several "
               "GPUs of this host run `tune --gpus all`, and for many hosts give a PostgreSQL --db URL")


class _KeyLog:
    """The tuning loop's progress events of every GPU thread as one line per finished key on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def for_gpu(self, gpu: int) -> Any:
        log = self

        class _Gpu:
            def start(self, total: int) -> None: ...
            def advance(self, key: Key, n: int = 1) -> None: ...
            def finish(self) -> None: ...

            def key_done(self, result: Any) -> None:
                w = result.winner
                best = f"{w.config} {w.median_ms:.3f} ms" if w is not None else "no winner"
                with log._lock:
                    log.done += 1
                    click.echo(f"[gpu{gpu}] [{log.done}/{log.total}] {result.key}: {best}; {result.new_trials} new, "
                               f"{result.skipped} stored; elapsed {time.monotonic() - log._started:.0f}s", err=True)
        return _Gpu()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", text)[:24] or "host"


def gpu_count() -> int:
    """How many CUDA GPUs this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _detect(wanted: list[int] | str | None, arch: str | None) -> list[Any]:
    """The GPUs to tune on (GpuInfo, each of a known arch, all of `arch` when given)."""
    from ...db.arch import normalize_arch
    from .. import gpu as gpus

    count = gpu_count()
    try:  # without --gpus, GPU 0 as plain `tune` uses
        indices = select_gpus([0] if wanted is None else None if wanted == "all" else list(wanted), count)
    except ValueError as error:
        raise CliError(f"--gpus: {error}") from None
    infos = [gpus.detect_gpu(i) for i in indices]
    for gpu in infos:
        try:
            normalize_arch(gpu.arch)
        except ValueError as error:
            raise CliError(f"GPU {gpu.index} ({gpu.name}) is {gpu.arch}: {error}") from None
        if arch is not None and gpu.arch != arch:
            raise CliError(f"--arch {arch} differs from GPU {gpu.index}, {gpu.name} ({gpu.arch}); pick GPUs of "
                           f"{arch} with --gpus")
    return infos


def _was_given(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def tune_fleet(*, gpus: list[int] | str | None, job: str | None, join: str | None, lease_s: float | None,
               arch: str | None, keys_for: Callable[[str], tuple[list[Key], bool]], kernel_only: bool,
               db_url: str | None, budget: float | None, trial_timeout: float, compile_threads: int | None,
               as_json: bool, args: dict[str, Any], compile_procs: int | None = None) -> None:
    """Run `tune` as a fleet worker set on this host's GPUs; see the module docstring."""
    from ...kernel.version import KERNEL_VERSION

    url = db_url if db_url else default_url()
    if job is not None and join is not None:
        raise CliError("--job and --join: give one (--job NAME creates the job, --join NAME works on it)")
    for name, option in ((job, "--job"), (join, "--join")):
        if name is not None:
            try:
                check_job_name(name)
            except JobError as error:
                raise CliError(f"{option}: {error}") from None
    if join is not None:
        if sqlite_path(url) is not None:
            raise CliError(SQLITE_JOIN.format(url=mask_url(url)))
        options = {"seq": "--seq", "head_dim": "--head-dim", "dtype": "--dtype", "causal": "--causal/--no-causal",
                   "batch_heads": "--batch-heads", "groups": "--group", "ops": "--op", "kernel_only": "--kernel-only",
                   "recorded": "--recorded", "lease_s": "--lease"}
        given = [option for name, option in options.items() if _was_given(name)]
        if given:
            raise CliError(f"--join: the job holds the keys, options and lease; drop {', '.join(given)}")
    lease = DEFAULT_LEASE_S if lease_s is None else lease_s

    started = time.monotonic()
    try:
        if join is not None:
            with Store.open(url, create=False) as store:
                the_job = JobQueue(store).get(join)
                if JobQueue(store).remaining(the_job) == 0:
                    _finished(the_job, as_json)
                    return
            if the_job.kernel_version != KERNEL_VERSION:
                raise CliError(f"--join: job {join} tunes kernel version {the_job.kernel_version}; this flashtune's "
                               f"is {KERNEL_VERSION}: run the same flashtune on every worker")
            infos = _detect(gpus, arch)
            mine = [g for g in infos if g.arch == the_job.arch]
            if not mine:
                raise CliError(f"--join: job {join} is for {the_job.arch}; the GPUs given are "
                               f"{', '.join(sorted({g.arch for g in infos}))}")
            for other in (g for g in infos if g.arch != the_job.arch):
                click.echo(f"note: GPU {other.index} ({other.arch}) does not work on {the_job.arch} job {join}",
                           err=True)
            plan = [(the_job, mine)]
        else:
            infos = _detect(gpus, arch)
            archs = sorted({g.arch for g in infos})
            if job is not None and len(archs) > 1:
                raise CliError(f"--job: the GPUs given are of several archs ({', '.join(archs)}) and a job holds "
                               "one arch's keys; pick GPUs of one arch with --gpus")
            keys_by_arch = {a: keys_for(a)[0] for a in archs}
            with Store.open(url) as store:
                queue = JobQueue(store)
                plan = []
                for a in archs:
                    name = job or (f"local-{_safe(infos[0].host)}-{a}-"
                                   f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{os.getpid()}")
                    created, _ = queue.create(name, a, KERNEL_VERSION, claim_units(keys_by_arch[a]), lease_s=lease,
                                              args={"kernel_only": kernel_only}, host=infos[0].host)
                    plan.append((created, [g for g in infos if g.arch == a]))
    except (StoreError, ValueError) as error:
        raise CliError(error) from None
    _run(plan, url, budget, trial_timeout, compile_threads, compile_procs, as_json, args, started)


def _finished(job: Job, as_json: bool) -> None:
    message = f"job {job.name} is finished: every key is done, nothing to tune"
    if as_json:
        from ..cli.common import echo_json
        echo_json({"job": job.name, "status": "done", "keys": [], "message": message})
    else:
        click.echo(message, err=True)


def _run(plan: Sequence[tuple[Job, list[Any]]], url: str, budget: float | None, trial_timeout: float,
         compile_threads: int | None, compile_procs: int | None, as_json: bool, args: dict[str, Any],
         started: float) -> None:
    """One thread per GPU on its job until every job is done, Ctrl-C or the budget; then the summary."""
    from ..cli.tune import _print_summary, _summary
    from ..loop import TuneSettings
    from ..session import tuning_session

    gpus = [gpu for _, group in plan for gpu in group]
    # The GPUs' workers compile at the same time: each gets its share of the host's cores.
    threads = compile_threads or compile_share(len(gpus))
    procs = compile_share(len(gpus)) if compile_procs is None else compile_procs
    stop = {"requested": False}
    with Store.open(url, create=False) as store:
        total = sum(len(s.keys) - s.counts["done"] for job, _ in plan for s in JobQueue(store).status(job.name))
    log = _KeyLog(total)
    outcomes: dict[int, tuple[int | None, WorkResult | None, BaseException | None]] = {}

    def gpu_main(job: Job, gpu: Any) -> None:
        run_id = None
        try:
            with tuning_session(url, {**args, "job": job.name, "gpu": gpu.index}, gpu=gpu, compile_threads=threads,
                                compile_procs=procs, trial_timeout_s=trial_timeout, kernel_only=bool(job.args.get("kernel_only"))) as session:
                run_id = session.run_id
                progress = log.for_gpu(gpu.index)

                def tune_unit(keys: Sequence[Key], should_stop: Callable[[], bool]) -> Any:
                    return session.tune(keys, settings=TuneSettings(), progress=progress, should_stop=should_stop,
                                        keep_order=True)

                result = work(JobQueue(session.store), job, Worker(gpu.host, os.getpid(), gpu.index, gpu.name),
                              tune_unit, should_stop=lambda: stop["requested"], budget_s=budget)
                session.status = result.status
            outcomes[gpu.index] = (run_id, result, None)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
            stop["requested"] = True  # the other GPUs stop too: the run failed
            outcomes[gpu.index] = (run_id, None, error)

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        click.echo("\nstopping after the trials in flight (Ctrl-C again to abort now)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    workers = [threading.Thread(target=gpu_main, args=(job, gpu), name=f"flashtune-gpu{gpu.index}", daemon=True)
               for job, group in plan for gpu in group]
    try:
        for thread in workers:
            thread.start()
        while any(t.is_alive() for t in workers):
            for thread in workers:
                thread.join(0.2)
    except KeyboardInterrupt:
        click.echo("aborted; the trials measured so far are stored: run the same command again to resume", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    errors = [error for _, _, error in outcomes.values() if error is not None]
    if errors:
        from ..session import SessionError
        from ..worker import WorkerError
        if isinstance(errors[0], (SessionError, WorkerError, StoreError, ValueError)):
            raise CliError(errors[0]) from None
        raise errors[0]
    order = {key: i for job, _ in plan for i, key in enumerate(_job_keys(url, job))}
    results = sorted((r for _, res, _ in outcomes.values() if res for r in res.results), key=lambda r: order[r.key])
    statuses = {res.status for _, res, _ in outcomes.values() if res}
    status = "interrupted" if "interrupted" in statuses else "budget" if "budget" in statuses else "done"
    summary = _summary(results)
    summary.update(status=status, elapsed_s=round(time.monotonic() - started, 1),
                   jobs=[job.name for job, _ in plan], keys_planned=len(order),
                   gpus=[{**asdict(gpu), "run_id": outcomes[gpu.index][0], "units": outcomes[gpu.index][1].claims,
                          "keys": len(outcomes[gpu.index][1].results), "lost_claims": outcomes[gpu.index][1].lost}
                         for gpu in gpus])
    if as_json:
        from ..cli.common import echo_json
        echo_json(summary)
    else:
        _print_summary(summary)
        per_gpu = ", ".join(f"gpu{g['index']} {g['keys']} keys" for g in summary["gpus"])
        click.echo(f"job {', '.join(summary['jobs'])}: {len(results)} keys tuned here ({per_gpu}) in "
                   f"{summary['elapsed_s']:.0f} s", err=True)
        if status != "done":
            click.echo(f"stopped ({status}); run the same command again to resume", err=True)
    if status == "interrupted":
        sys.exit(130)


def _job_keys(url: str, job: Job) -> list[Key]:
    with Store.open(url, create=False) as store:
        return [k.key for k in JobQueue(store).status(job.name)[0].keys]
