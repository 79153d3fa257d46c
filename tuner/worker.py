"""The benchmark worker: a spawned child process that owns the GPU and is replaced when a config kills it.

A config that triggers an illegal address or a launch failure poisons the CUDA context for good, so
benchmarks never run in the tuner's own process. The child imports torch once and serves requests
over a pipe (tuner.child); the parent (`WorkerBench`) restarts it when it dies, reports a sticky CUDA error or
goes silent for longer than the per-trial timeout. A batch that fails as a whole is retried one
config at a time, so that the crash or hang is pinned on the config that caused it.

With a compile pool (tuner.compile_pool) the batch's kernel configs are first compiled in the
pool's processes, so that the worker's own first launches only load them from Triton's cache.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any, Callable, Generator, Iterator, Sequence

from ..db.errors import first_line
from ..db.types import Config, Key
from ..kernel.providers import KERNEL, provider_of

from .child import START_TIMEOUT_S, Child
from .compile_pool import CompilePool
from .measure import Bench, Measurement

DEFAULT_TRIAL_TIMEOUT_S = 180.0  # the longest a compile or a timing may stay silent


def cuda_bench(device_index: int, compile_threads: int) -> Bench:
    """The production bench of a worker: LocalBench on CUDA device `device_index`; on a machine without
    CUDA under TRITON_INTERPRET=1, LocalBench on the CPU (the interpreter), so the whole worker runs
    in CPU tests."""
    import torch

    from ..kernel.device import INTERPRET
    from .bench import LocalBench

    if INTERPRET and not torch.cuda.is_available():
        # The interpreter's times are no performance figures: the fewest repetitions that still run every
        # step of the harness (the careful pass's twice-timed default included).
        return LocalBench(torch.device("cpu"), compile_threads=compile_threads, quick=(0, 1), careful=(1, 2))
    torch.cuda.set_device(device_index)
    return LocalBench(torch.device("cuda", device_index), compile_threads=compile_threads)


class _Measure:
    """The worker's request handler: ('measure', id, key fields, batch_heads, config texts, careful) →
    ('result', id, measurement) for each config, then ('done', id); ('lost', id, configs, error) and
    exit when the CUDA context is lost; ('error', id, line) when the harness fails outside a trial."""

    def __init__(self, conn: Connection, factory: Callable[..., Bench], factory_args: tuple[Any, ...]) -> None:
        from .bench import CudaContextLost  # imports torch: only the child does

        self.conn, self.lost = conn, CudaContextLost
        self.bench = factory(*factory_args)

    def __call__(self, request: tuple[Any, ...]) -> None:
        _, batch_id, key_fields, batch_heads, config_texts, careful = request
        key = Key(**key_fields)
        configs = [Config.parse(text) for text in config_texts]
        try:
            for m in self.bench.measure(key, batch_heads, configs, careful=careful):
                self.conn.send(("result", batch_id, m.to_wire()))
        except self.lost as lost:
            self.conn.send(("lost", batch_id, [str(c) for c in lost.configs], lost.error_text))
            os._exit(3)  # the context is gone; exiting is the only clean-up left
        except Exception as error:  # noqa: BLE001 - a harness bug: report it rather than hang the parent
            self.conn.send(("error", batch_id, first_line(error)))
            return
        self.conn.send(("done", batch_id))


class WorkerError(RuntimeError):
    """The worker could not start, or the harness inside it failed outside any single trial."""


class WorkerBench:
    """A Bench that runs every measurement in a restartable child process on GPU `device_index`.

    `factory(*factory_args)` builds the bench inside the child; it must be importable by name
    (spawn pickles it by reference). The default is LocalBench on the CUDA device. `pool`: a
    compile pool on the same device that warms each batch of two or more kernel configs before
    the worker gets it (owned: `close` stops it); None compiles in the worker's threads alone.
    """

    def __init__(self, device_index: int = 0, *, compile_threads: int = 8,
                 trial_timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S,
                 factory: Callable[..., Bench] = cuda_bench, factory_args: tuple[Any, ...] | None = None,
                 pool: CompilePool | None = None) -> None:
        self.trial_timeout_s = trial_timeout_s
        self.pool = pool
        self.warm_s = 0.0  # wall time spent waiting for the pool
        self._warmed: tuple[Key, int, set[Config]] | None = None  # the configs of the last key warmed
        self._factory = factory
        self._factory_args = (device_index, compile_threads) if factory_args is None else factory_args
        self.restarts = 0
        self._ctx = mp.get_context("spawn")  # fork would copy the parent's CUDA state
        self._child: Child | None = None  # the worker process, started or starting (not yet ready)
        self._batch = 0

    def _spawn(self) -> None:
        """Start a worker process unless one is running or starting, without waiting for it: it
        imports torch and makes its CUDA context while the compile pool compiles the first batch."""
        child = self._child
        if child is not None and (not child.ready or child.proc.is_alive()):
            return
        self._kill()
        self._child = Child(self._ctx, "flashtune-bench", _Measure, self._factory, self._factory_args)

    def _start(self) -> Connection:
        if self._child is not None and self._child.ready and self._child.proc.is_alive():
            return self._child.conn
        self._spawn()
        child = self._child
        assert child is not None
        if not child.conn.poll(START_TIMEOUT_S):
            self._kill()
            raise WorkerError(f"the benchmark worker did not start within {START_TIMEOUT_S:.0f} s")
        try:
            message = child.conn.recv()
        except EOFError:
            self._kill()
            raise WorkerError("the benchmark worker exited while starting") from None
        if message[0] != "ready":
            self._kill()
            raise WorkerError(f"the benchmark worker could not start: {message[1]}")
        child.ready = True
        return child.conn

    def _kill(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1

    def measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                careful: bool) -> Iterator[Measurement]:
        pending: dict[Config, None] = dict.fromkeys(configs)
        suspects: list[Config] = []  # configs to run one at a time after their batch was lost
        try:
            while pending:
                suspects = [c for c in suspects if c in pending]
                batch = suspects[:1] if suspects else list(pending)
                batch = self._warm(key, batch_heads, batch, reorder=not careful)
                failure = yield from self._run_batch(key, batch_heads, batch, careful, pending)
                if failure is None:
                    for config in batch:
                        if config in pending:  # the harness skipped it; never loop on it
                            pending.pop(config)
                            yield Measurement(config, "compile_error", error="benchmark worker returned no result")
                    continue
                outcome, text, blamed = failure
                self._restart()
                if len(batch) == 1:
                    pending.pop(batch[0], None)
                    yield Measurement(batch[0], outcome, error=text)
                else:  # pin the crash or hang on one config: rerun the suspects singly
                    suspects = [c for c in (blamed or batch) if c in pending]
        finally:
            if pending and self._child is not None and self._child.ready:
                self._restart()  # abandoned mid-batch (stop requested): drop the stale replies

    def _warm(self, key: Key, batch_heads: int, batch: list[Config], *, reorder: bool) -> list[Config]:
        """Have the pool compile the batch's kernel configs not yet warmed for this key. With
        `reorder` (the first pass, whose outcome does not depend on the order: its pruning keeps
        what is within the ratio of the final best) the batch comes back with the configs the pool
        could not compile last, so that the worker's own compiles of them (compile errors, mostly)
        share its last thread chunks rather than stall every chunk; the careful pass keeps its order
        (the default first: it is timed twice for the noise). One config alone is left to the
        worker (a pool process would only add its round trip); so are torch SDPA's backends, which
        compile nothing. Nothing else the pool reports is used: the worker's own first launch
        decides each trial, as without a pool."""
        if self.pool is None:
            return batch
        if self._warmed is None or self._warmed[:2] != (key, batch_heads):
            self._warmed = (key, batch_heads, set())
        done = self._warmed[2]
        todo = [c for c in batch if provider_of(c) == KERNEL and c not in done]
        if len(todo) < 2:
            return batch
        self._spawn()  # the worker starts meanwhile (only the first time, or after a restart)
        start = time.monotonic()
        warmed = self.pool.warm(key, batch_heads, todo)
        self.warm_s += time.monotonic() - start
        done.update(todo)
        if not reorder:
            return batch
        failed = {c for c, w in warmed.items() if w.outcome != "ok"}
        return [c for c in batch if c not in failed] + [c for c in batch if c in failed]

    def _run_batch(self, key: Key, batch_heads: int, batch: list[Config], careful: bool,
                   pending: dict[Config, None]) -> Generator[Measurement, None, tuple[str, str, list[Config] | None] | None]:
        """Send one batch and yield its results; return (outcome, error, configs to blame) if the worker was lost."""
        conn = self._start()
        self._batch += 1
        batch_id = self._batch
        conn.send(("measure", batch_id, asdict(key), batch_heads, [str(c) for c in batch], careful))
        while True:
            try:
                ready = conn.poll(self.trial_timeout_s)
            except (EOFError, OSError):
                ready = True
            if not ready:
                return "timeout", f"no result within {self.trial_timeout_s:.0f} s (worker killed)", None
            try:
                message = conn.recv()
            except (EOFError, OSError):
                code = None
                if self._child is not None:
                    self._child.proc.join(timeout=10)  # reap it so that its exit code is known
                    code = self._child.proc.exitcode
                return "crashed", f"benchmark worker died (exit code {code})", None
            kind, got_id = message[0], message[1]
            if got_id != batch_id:
                continue
            if kind == "result":
                m = Measurement.from_wire(message[2])
                if m.config in pending:
                    pending.pop(m.config)
                    yield m
            elif kind == "lost":
                return "crashed", message[3], [Config.parse(t) for t in message[2]]
            elif kind == "error":
                raise WorkerError(f"benchmark harness failed: {message[2]}")
            elif kind == "done":
                return None

    def close(self) -> None:
        child = self._child
        if child is not None and child.ready:
            try:
                child.conn.send(("stop",))
            except (OSError, ValueError):
                pass
            deadline = time.monotonic() + 10
            while child.proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._kill()
        if self.pool is not None:
            self.pool.close()
