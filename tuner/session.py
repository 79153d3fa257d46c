"""One tuning session: GPU → store → run record → benchmark worker → tuner → the run's end mark.

The `tune` command and `bench/tuner_exhaustive.py` both tune through `tuning_session`, so the run
record, the worker's lifetime and the run's final status ('done', 'budget', 'interrupted',
'failed') are handled in one place:

    with tuning_session(db_url, {"seq": "128..4096"}, arch="sm_90") as session:
        results = session.tune(keys_for(session.gpu.arch))
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..db.arch import normalize_arch
from ..db.errors import StoreError, one_line
from ..db.store import Store
from ..db.types import Config, Key
from ..kernel.sdpa import available_providers
from ..kernel.providers import KERNEL, provider_config, provider_of
from ..kernel.version import OP_VERSIONS

from . import gpu as gpus, worker
from .bench import fill_batch_heads
from .compile_pool import pool_for_gpu
from .loop import KeyResult, Progress, Tuner, TuneSettings
from .measure import Bench
from .ops import part_keys, spec_of, with_parts
from .ops.sdpa import key_backends


class SessionError(RuntimeError):
    """The session cannot start: no GPU, a GPU of an unknown arch, or an `arch` other than the GPU's."""


def session_gpu(arch: str | None = None) -> gpus.GpuInfo:
    """The GPU to tune on (CUDA device 0). SessionError when there is none, its arch is unknown, or it
    is not `arch`."""
    try:
        gpu = gpus.detect_gpu()
    except gpus.NoGpuError as error:
        raise SessionError(str(error)) from None
    try:
        normalize_arch(gpu.arch)
    except ValueError as error:
        raise SessionError(f"{gpu.name} is {gpu.arch}: {error}") from None
    if arch is not None and normalize_arch(arch) != gpu.arch:
        raise SessionError(f"--arch {arch} differs from the GPU present, {gpu.name} ({gpu.arch}); "
                           "tune on that GPU, or plan with --dry-run")
    return gpu


@dataclass
class TuningSession:
    """An open session: its GPU, store, run id and benchmark worker. `tune` may be called more than once."""

    gpu: gpus.GpuInfo
    store: Store
    run_id: int
    bench: Bench
    status: str = "failed"  # what the run is marked at the end unless a tune() finishes
    finish_error: str | None = None  # why the run's end mark could not be written, if it could not
    kernel_only: bool = False  # no SDPA provider candidates (`tune --kernel-only`)

    def space(self, key: Key) -> list[Config]:
        """The kernel configs the tuner times for `key` on this GPU: its op's space (tuner.ops), or, for an
        op composed of others, the candidates composed from its parts' trials in this database."""
        return session_space(key, self.gpu, self.store)

    def default(self, key: Key) -> Config:
        """The default config of `key`'s op on this GPU."""
        return spec_of(key).default(key, self.gpu)

    def providers(self, key: Key) -> list[Config]:
        """One config per SDPA backend this torch has, for ops whose SDPA backends compete, unless the
        session is kernel-only."""
        return key_providers(key, self.kernel_only)

    def batch_heads(self, key: Key) -> int:
        """B·Hq of the benchmark inputs: the key's bucket; for a key without one, enough work to fill this GPU."""
        return key.batch_heads or fill_batch_heads(key.seq_len, self.gpu.sm_count)

    def tune(self, keys: Sequence[Key], *, space: Callable[[Key], Sequence[Config]] | None = None,
             default: Callable[[Key], Config] | None = None, batch_heads: Callable[[Key], int] | None = None,
             settings: TuneSettings = TuneSettings(), progress: Progress | None = None,
             should_stop: Callable[[], bool] = lambda: False, keep_order: bool = False) -> list[KeyResult]:
        """Tune `keys`, by default over this GPU's space and the SDPA providers against the kernel's
        default config; the session's status becomes 'done', or why the tuner stopped early
        ('budget', 'interrupted'). `keep_order`: in the order given, not tuning order."""
        keys = with_parts(keys)  # a composed key's parts first: its candidates come from their trials
        tuner = Tuner(self.store, self.run_id, self.bench, kernel_version=OP_VERSIONS,
                      gpu_name=self.gpu.name,
                      space=space or self.space, default=default or self.default,
                      batch_heads=batch_heads or self.batch_heads, providers=self.providers, settings=settings,
                      progress=progress, should_stop=should_stop)
        results = tuner.run(keys, keep_order=keep_order)
        self.status = tuner.stop_reason or "done"
        return results


def session_space(key: Key, gpu: gpus.GpuInfo, store: Store | None = None) -> list[Config]:
    """A key's kernel candidates on `gpu` (a planned one for --dry-run): its op's space, e.g. for the
    forward tuner.ops.fwd's configs and the TMA kernel's on sm_90. Also what `tune --dry-run` counts.
    An op composed of others (the training pair) composes them from its parts' ok kernel trials in
    `store`, on this GPU with the parts' current versions, fastest first (none without a store)."""
    spec = spec_of(key)
    if spec.compose is None:
        return spec.space(key, gpu)
    ranked = {}
    for part in part_keys(key):
        trials = [] if store is None else store.trials(part, kernel_version=OP_VERSIONS[part.op], gpu_name=gpu.name,
                                                       outcome="ok")
        fastest = sorted((t for t in trials if t.median_ms and provider_of(t.config) == KERNEL),
                         key=lambda t: (t.median_ms, str(t.config)))
        ranked[part.op] = list(dict.fromkeys(t.config for t in fastest))
    return spec.compose(key, gpu, ranked)


def provider_configs() -> list[Config]:
    """One candidate config per SDPA backend this torch has."""
    return [provider_config(p) for p in available_providers()]


def key_providers(key: Key, kernel_only: bool = False) -> list[Config]:
    """The SDPA backend configs that compete for `key`: none for kernel-only runs, for ops whose
    spec says SDPA's backends are no candidate (the backward: see tuner.ops.bwd) or for keys whose call SDPA
    does not compute (a softcap, sinks, dropout); for keys SDPA computes through an attn_mask (a window,
    ALiBi, a mask), the backends that take one (tuner.ops.sdpa)."""
    if kernel_only or not spec_of(key).sdpa_competes(key):
        return []
    return [provider_config(p) for p in key_backends(key, available_providers())]


@contextmanager
def tuning_session(db_url: str | None, args: Mapping[str, Any], *, arch: str | None = None,
                   gpu: gpus.GpuInfo | None = None, compile_threads: int = 8, compile_procs: int = 0,
                   trial_timeout_s: float = worker.DEFAULT_TRIAL_TIMEOUT_S,
                   kernel_only: bool = False) -> Iterator[TuningSession]:
    """Open a session on `gpu` (default: the GPU present, checked against `arch`), writing to the
    database at `db_url` a run that records `args`; on exit mark the run with its status, stop the
    worker and close the store. `compile_procs`: the size of the worker's compile pool
    (tuner.compile_pool; 0, or no CUDA: none, the worker compiles in its `compile_threads` alone).

    Raises SessionError before anything is written for a missing or wrong GPU, and StoreError or
    ValueError for an unusable database or URL. Ctrl-C inside marks the run 'interrupted'.
    """
    gpu = gpu if gpu is not None else session_gpu(arch)
    store = Store.open(db_url)
    try:
        run_id = store.start_run(gpus.run_info(gpu, args))
    except BaseException:
        store.close()
        raise
    pool = pool_for_gpu(gpu.index, compile_procs, timeout_s=trial_timeout_s)
    bench = worker.WorkerBench(gpu.index, compile_threads=compile_threads, trial_timeout_s=trial_timeout_s,
                               pool=pool)
    session = TuningSession(gpu, store, run_id, bench, kernel_only=kernel_only)
    try:
        yield session
    except KeyboardInterrupt:
        session.status = "interrupted"
        raise
    finally:
        try:
            store.finish_run(run_id, session.status)
        except StoreError as error:  # the run's trials are committed; only its end mark is lost
            session.finish_error = f"could not mark run {run_id} {session.status}: {one_line(error)}"
        bench.close()
        store.close()
