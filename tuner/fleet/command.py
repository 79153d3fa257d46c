"""The `tune` command's fleet branch: `--gpus`, `--job NAME`, `--join NAME`.

Every form runs the same way: the keys are a job in the database (`flashtune.db.jobs`), and one
worker thread per GPU drives that GPU's benchmark worker process (`tuner.worker.WorkerBench`, inside a
tuning session with its own run record) through the claim loop of `tuner.fleet.worker`. `--gpus`
alone makes a job of its own per arch (GPUs of different archs tune their own arch's keys); `--job
NAME` names the job so that other hosts can `--join NAME` it through PostgreSQL. Bad input (a GPU
index this host lacks, `--join` on SQLite, a job of another arch or kernel version) is a TuneError
(one line and exit code 2 from the CLI) before anything is written. The run's summary is the
command's to print: `tune_fleet` returns what the run came to (`FleetRun`).
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from ...db.errors import StoreError
from ...db.jobs import Job, JobError, JobQueue, Worker, check_job_name
from ...db.paths import default_url, sqlite_path
from ...db.text import mask_url
from ...db.store import Store
from ...db.types import Key
from ..interrupt import StopRequest, stop_on_ctrl_c
from ..options import TuneError, TuneOptions
from .gpus import select_gpus
from .units import claim_units
from .worker import WorkResult, work

if TYPE_CHECKING:
    from ..loop import KeyResult

DEFAULT_LEASE_S = 60.0
SQLITE_JOIN = ("--join: {url} is SQLite, and SQLite cannot share a queue across hosts; to tune several "
               "GPUs of this host run `tune --gpus all`, and for many hosts give a PostgreSQL --db URL")
# The options a job holds, by parameter name: `--join` takes them from the job, not the command line.
JOB_OPTIONS = {"seq": "--seq", "head_dim": "--head-dim", "dtype": "--dtype", "causal": "--causal/--no-causal",
               "batch_heads": "--batch-heads", "groups": "--group", "ops": "--op", "kernel_only": "--kernel-only",
               "recorded": "--recorded", "lease_s": "--lease", "softcap": "--softcap", "window": "--window",
               "sinks": "--sinks", "alibi": "--alibi", "mask": "--mask", "dropout": "--dropout"}


@dataclass
class FleetRun:
    """What a fleet run came to: its jobs, its status ('done', 'budget', 'interrupted'), the keys tuned
    here in job order, the keys the jobs hold, its wall time and, per GPU, its fields (GpuInfo), run id,
    units claimed, keys tuned and claims lost. `finished`: `--join` found nothing left to tune."""

    jobs: list[str]
    status: str = "done"
    results: list[KeyResult] = field(default_factory=list)
    keys_planned: int = 0
    elapsed_s: float = 0.0
    gpus: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


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


def _detect(wanted: Sequence[int] | str | None, arch: str | None) -> list[Any]:
    """The GPUs to tune on (GpuInfo, each of a known arch, all of `arch` when given)."""
    from ...db.arch import normalize_arch
    from .. import gpu as gpus

    count = gpu_count()
    try:  # without --gpus, GPU 0 as plain `tune` uses
        indices = select_gpus([0] if wanted is None else None if wanted == "all" else list(wanted), count)
    except ValueError as error:
        raise TuneError(f"--gpus: {error}") from None
    infos = [gpus.detect_gpu(i) for i in indices]
    for gpu in infos:
        try:
            normalize_arch(gpu.arch)
        except ValueError as error:
            raise TuneError(f"GPU {gpu.index} ({gpu.name}) is {gpu.arch}: {error}") from None
        if arch is not None and gpu.arch != arch:
            raise TuneError(f"--arch {arch} differs from GPU {gpu.index}, {gpu.name} ({gpu.arch}); pick GPUs of "
                            f"{arch} with --gpus")
    return infos


def tune_fleet(options: TuneOptions) -> FleetRun:
    """Run `tune` with `options` as a fleet worker set on this host's GPUs; see the module docstring."""
    from ...kernel.version import KERNEL_VERSION

    fleet = options.fleet
    job, join = fleet.job, fleet.join
    url = options.db_url if options.db_url else default_url()
    if job is not None and join is not None:
        raise TuneError("--job and --join: give one (--job NAME creates the job, --join NAME works on it)")
    for name, option in ((job, "--job"), (join, "--join")):
        if name is not None:
            try:
                check_job_name(name)
            except JobError as error:
                raise TuneError(f"{option}: {error}") from None
    if join is not None:
        if sqlite_path(url) is not None:
            raise TuneError(SQLITE_JOIN.format(url=mask_url(url)))
        given = [option for name, option in JOB_OPTIONS.items() if name in options.given]
        if given:
            raise TuneError(f"--join: the job holds the keys, options and lease; drop {', '.join(given)}")
    lease = DEFAULT_LEASE_S if fleet.lease_s is None else fleet.lease_s

    started = time.monotonic()
    try:
        if join is not None:
            with Store.open(url, create=False) as store:
                the_job = JobQueue(store).get(join)
                if JobQueue(store).remaining(the_job) == 0:
                    return FleetRun([the_job.name], finished=True)
            if the_job.kernel_version != KERNEL_VERSION:
                raise TuneError(f"--join: job {join} tunes kernel version {the_job.kernel_version}; this flashtune's "
                                f"is {KERNEL_VERSION}: run the same flashtune on every worker")
            infos = _detect(fleet.gpus, options.arch)
            mine = [g for g in infos if g.arch == the_job.arch]
            if not mine:
                raise TuneError(f"--join: job {join} is for {the_job.arch}; the GPUs given are "
                                f"{', '.join(sorted({g.arch for g in infos}))}")
            for other in (g for g in infos if g.arch != the_job.arch):
                click.echo(f"note: GPU {other.index} ({other.arch}) does not work on {the_job.arch} job {join}",
                           err=True)
            plan = [(the_job, mine)]
        else:
            infos = _detect(fleet.gpus, options.arch)
            archs = sorted({g.arch for g in infos})
            if job is not None and len(archs) > 1:
                raise TuneError(f"--job: the GPUs given are of several archs ({', '.join(archs)}) and a job holds "
                                "one arch's keys; pick GPUs of one arch with --gpus")
            keys_by_arch = {a: options.keys(a) for a in archs}
            with Store.open(url) as store:
                queue = JobQueue(store)
                plan = []
                for a in archs:
                    name = job or (f"local-{_safe(infos[0].host)}-{a}-"
                                   f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{os.getpid()}")
                    created, _ = queue.create(name, a, KERNEL_VERSION, claim_units(keys_by_arch[a]), lease_s=lease,
                                              args={"kernel_only": options.kernel_only}, host=infos[0].host)
                    plan.append((created, [g for g in infos if g.arch == a]))
    except (StoreError, ValueError) as error:
        raise TuneError(error) from None
    return _run(plan, url, options, started)


def _run(plan: Sequence[tuple[Job, list[Any]]], url: str, options: TuneOptions, started: float) -> FleetRun:
    """One thread per GPU on its job until every job is done, Ctrl-C or the budget."""
    from ..loop import TuneSettings
    from ..session import tuning_session

    gpus = [gpu for _, group in plan for gpu in group]
    threads, procs = options.compile_shares(len(gpus))
    args = options.run_args()
    with Store.open(url, create=False) as store:
        total = sum(len(s.keys) - s.counts["done"] for job, _ in plan for s in JobQueue(store).status(job.name))
    log = _KeyLog(total)
    outcomes: dict[int, tuple[int | None, WorkResult | None, BaseException | None]] = {}

    def gpu_main(job: Job, gpu: Any, stop: StopRequest) -> None:
        run_id = None
        try:
            with tuning_session(url, {**args, "job": job.name, "gpu": gpu.index}, gpu=gpu, compile_threads=threads,
                                compile_procs=procs, trial_timeout_s=options.trial_timeout_s,
                                kernel_only=bool(job.args.get("kernel_only"))) as session:
                run_id = session.run_id
                progress = log.for_gpu(gpu.index)

                def tune_unit(keys: Sequence[Key], should_stop: Callable[[], bool]) -> Any:
                    return session.tune(keys, settings=TuneSettings(), progress=progress, should_stop=should_stop,
                                        keep_order=True)

                result = work(JobQueue(session.store), job, Worker(gpu.host, os.getpid(), gpu.index, gpu.name),
                              tune_unit, should_stop=stop, budget_s=options.budget_s)
                session.status = result.status
            outcomes[gpu.index] = (run_id, result, None)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
            stop.requested = True  # the other GPUs stop too: the run failed
            outcomes[gpu.index] = (run_id, None, error)

    with stop_on_ctrl_c("the trials in flight") as stop:
        workers = [threading.Thread(target=gpu_main, args=(job, gpu, stop), name=f"flashtune-gpu{gpu.index}",
                                    daemon=True)
                   for job, group in plan for gpu in group]
        for thread in workers:
            thread.start()
        while any(t.is_alive() for t in workers):
            for thread in workers:
                thread.join(0.2)
    errors = [error for _, _, error in outcomes.values() if error is not None]
    if errors:
        from ..session import SessionError
        from ..worker import WorkerError
        if isinstance(errors[0], (SessionError, WorkerError, StoreError, ValueError)):
            raise TuneError(errors[0]) from None
        raise errors[0]
    order = {key: i for job, _ in plan for i, key in enumerate(_job_keys(url, job))}
    results = sorted((r for _, res, _ in outcomes.values() if res for r in res.results), key=lambda r: order[r.key])
    statuses = {res.status for _, res, _ in outcomes.values() if res}
    status = "interrupted" if "interrupted" in statuses else "budget" if "budget" in statuses else "done"
    return FleetRun([job.name for job, _ in plan], status, results, keys_planned=len(order),
                    elapsed_s=round(time.monotonic() - started, 1),
                    gpus=[{**asdict(gpu), "run_id": outcomes[gpu.index][0], "units": outcomes[gpu.index][1].claims,
                           "keys": len(outcomes[gpu.index][1].results), "lost_claims": outcomes[gpu.index][1].lost}
                          for gpu in gpus])


def _job_keys(url: str, job: Job) -> list[Key]:
    with Store.open(url, create=False) as store:
        return [k.key for k in JobQueue(store).status(job.name)[0].keys]
