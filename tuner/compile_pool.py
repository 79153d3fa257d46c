"""The compile pool: spawned processes that compile a batch of configs before the benchmark worker runs it.

Tuning is compile-bound: the first key of each (op, D, dtype, mask) family compiles its whole space
(76-153 configs), every later key only loads them. Triton's front end and MLIR passes hold the GIL,
so the worker's compile threads overlap little (about 0.25-0.3 s of wall per kernel on an H200 host
against about 0.07 s in separate processes). So before a batch goes to the worker
(tuner.worker.WorkerBench), the pool launches each of its kernel configs once in one of `procs`
processes on the key's compile-pool inputs (`OpSpec.warm_workload`: the real workload's shapes,
dtypes and strides at fewer sequences, no reference), which leaves the compiled kernel in Triton's
on-disk cache; the worker's own first launch then only loads it.

The pool only warms the cache. What a config's trial records is still decided by the worker's
own first launch (compile error, out of resources, crash, wrong result, time), so nothing the pool
reports reaches the database. A pool process that dies or hangs (an illegal address, a ptxas that
never returns) is killed and replaced, and its config simply is not warmed. The pool works on its
own (the worker waits for the batch to be warmed first) so that its launches never overlap the
worker's timings on the GPU.

The processes are children of the tuner's process, not of the worker: the worker is a daemonic
process, which multiprocessing does not let have children, and a pool outside it survives the
worker's restarts. Each holds a CUDA context on the worker's GPU (the index as the tuner sees it,
under the same CUDA_VISIBLE_DEVICES), or runs on the CPU under the Triton interpreter in tests,
where there is nothing to compile (`pool_for_gpu` gives no pool there).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from ..db.errors import first_line
from ..db.types import Config, Key

from .child import START_TIMEOUT_S, Child


@dataclass(frozen=True)
class Warmed:
    """What warming one config came to: `outcome` 'ok' (compiled and ran once), 'error' (the launch
    raised: the worker will meet and classify the same error), 'lost' (its process died), 'timeout'
    (its process was silent past the timeout and was killed) or 'skipped' (the pool is off or broken,
    or the op has no compile-pool inputs); `seconds` the launch's wall time; `error` one line."""

    outcome: str
    seconds: float = 0.0
    error: str | None = None


class _Warm:
    """A pool process's request handler: build the key's compile-pool inputs, launch each config asked
    for, answer.

    Requests: ('warm', token, key fields, batch_heads, config text) → ('ok'|'error', token, config
    text, seconds, error); ('release',) drops the inputs (sent after each batch, so that the pool
    holds no GPU memory while the worker validates and times).
    """

    def __init__(self, conn: Connection, device: str) -> None:
        import torch  # only the pool's processes import torch, kernel and ops: the tuner may not need them

        from ..kernel.errors import is_sticky_cuda_error
        from .ops import spec_of

        self.conn, self.torch, self.is_sticky, self.spec_of = conn, torch, is_sticky_cuda_error, spec_of
        self.where = torch.device(device)
        if self.where.type == "cuda":
            torch.cuda.set_device(self.where)
            torch.empty(1, device=self.where)  # create the context now, not during the first compile
        self.inputs: Any = None
        self.current: tuple[Key, int] | None = None

    def __call__(self, request: tuple[Any, ...]) -> None:
        cuda = self.where.type == "cuda"
        if request[0] == "release":
            self.inputs, self.current = None, None
            if cuda:
                self.torch.cuda.empty_cache()
            return
        _, token, key_fields, batch_heads, text = request
        start = time.perf_counter()
        try:
            key = Key(**key_fields)
            if self.current != (key, batch_heads):
                self.inputs, self.current = None, None  # free the last key's tensors before the next ones
                self.inputs = self.spec_of(key).warm_workload(key, batch_heads, self.where)
                self.current = (key, batch_heads)
            self.inputs.run(Config.parse(text))
            if cuda:
                self.torch.cuda.synchronize(self.where)
        except Exception as error:  # noqa: BLE001 - any failure only means: not warmed
            self.conn.send(("error", token, text, time.perf_counter() - start, first_line(error)))
            if self.is_sticky(error):
                os._exit(3)  # the context is gone: the pool replaces this process
            return
        self.conn.send(("ok", token, text, time.perf_counter() - start, None))


class _Slot(Child):
    """One pool process; `config` and `since`: the config it is warming, from when."""

    def __init__(self, ctx: Any, device: str) -> None:
        super().__init__(ctx, "flashtune-compile", _Warm, device)
        self.started = time.monotonic()
        self.config: Config | None = None
        self.since = 0.0


class CompilePool:
    """`procs` persistent processes on `device` ('cuda:I', or 'cpu' under the interpreter) that warm
    Triton's cache for a batch of configs (`warm`). Started at the first `warm`; `close` stops them.

    `timeout_s`: the longest one config's warm-up may take before its process is killed and
    replaced (the worker's per-trial timeout). A process that cannot start (no GPU, an import
    error) turns the whole pool off: every later `warm` answers 'skipped' and the worker compiles
    on its own, as without a pool; `broken` says why.
    """

    def __init__(self, device: str, procs: int, *, timeout_s: float = 180.0,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if procs < 1:
            raise ValueError(f"a compile pool needs at least one process, got {procs}")
        self.device, self.procs = device, procs
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.restarts = 0  # processes replaced after dying or hanging
        self.broken: str | None = None
        self._ctx = mp.get_context("spawn")  # fork would copy the tuner's CUDA state
        self._slots: list[_Slot] = []
        self._token = 0

    def pids(self) -> list[int]:
        """The process ids of the pool's processes (started or starting)."""
        return [s.proc.pid for s in self._slots if s.proc.pid is not None]

    def warm(self, key: Key, batch_heads: int, configs: Sequence[Config]) -> dict[Config, Warmed]:
        """Compile `configs` (kernel configs of `key`) into Triton's cache, one per free process at a
        time; returns what each came to. Never raises for a config: a failure only means the worker
        compiles that config itself."""
        todo = deque(dict.fromkeys(configs))
        if self.broken is not None or not todo:
            return {c: Warmed("skipped", error=self.broken) for c in todo}
        wanted = list(todo)
        self._fill()
        self._token += 1
        token, fields = self._token, asdict(key)
        done: dict[Config, Warmed] = {}
        try:
            while (todo or self._busy()) and self.broken is None:
                for slot in self._slots:
                    if todo and slot.ready and slot.config is None:
                        config = todo.popleft()
                        try:
                            slot.conn.send(("warm", token, fields, batch_heads, str(config)))
                        except (OSError, ValueError):  # died while idle: replaced below, config requeued
                            todo.appendleft(config)
                            self._replace(slot)
                            continue
                        slot.config, slot.since = config, time.monotonic()
                for conn in wait([s.conn for s in self._slots], self._wait_s()):
                    if self.broken is None:
                        self._receive(self._slot_of(conn), token, done)
                self._expire(done)
        finally:
            for slot in self._slots:
                slot.config = None  # abandoned (Ctrl-C): a late answer carries an old token and is ignored
            self._release()
        return {c: done.get(c) or Warmed("skipped", error=self.broken or "not warmed") for c in wanted}

    def _busy(self) -> bool:
        return any(s.config is not None for s in self._slots)

    def _fill(self) -> None:
        """Start the missing processes and replace any that died while idle (killed from outside)."""
        for slot in [s for s in self._slots if not s.proc.is_alive()]:
            self._replace(slot)
        while len(self._slots) < self.procs:
            self._slots.append(_Slot(self._ctx, self.device))

    def _replace(self, slot: _Slot) -> None:
        slot.kill()
        self._slots[self._slots.index(slot)] = _Slot(self._ctx, self.device)
        self.restarts += 1

    def _slot_of(self, conn: Any) -> _Slot:
        return next(s for s in self._slots if s.conn is conn)

    def _wait_s(self) -> float:
        """How long to wait for a message: until the next in-flight config or start-up times out."""
        now = time.monotonic()
        deadlines = [s.since + self.timeout_s for s in self._slots if s.config is not None]
        deadlines += [s.started + self.start_timeout_s for s in self._slots if not s.ready]
        return max(0.0, min(deadlines, default=now + 1.0) - now) + 0.01

    def _receive(self, slot: _Slot, token: int, done: dict[Config, Warmed]) -> None:
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):
            slot.proc.join(timeout=10)
            if not slot.ready:
                self._break(f"a compile process exited while starting (exit code {slot.proc.exitcode})")
                return
            if slot.config is not None:
                done[slot.config] = Warmed("lost", time.monotonic() - slot.since,
                                           f"compile process died (exit code {slot.proc.exitcode})")
            self._replace(slot)
            return
        kind = message[0]
        if kind == "ready":
            slot.ready = True
        elif kind == "fatal":
            self._break(f"a compile process could not start: {message[1]}")
        elif message[1] == token and slot.config is not None and message[2] == str(slot.config):
            done[slot.config] = Warmed(kind, message[3], message[4])
            slot.config = None

    def _expire(self, done: dict[Config, Warmed]) -> None:
        """Kill and replace processes silent past their timeout."""
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.config is not None and now - slot.since > self.timeout_s:
                done[slot.config] = Warmed("timeout", now - slot.since,
                                           f"no answer within {self.timeout_s:.0f} s (compile process killed)")
                self._replace(slot)
            elif not slot.ready and now - slot.started > self.start_timeout_s:
                self._break(f"a compile process did not start within {self.start_timeout_s:.0f} s")
                return

    def _break(self, why: str) -> None:
        self.broken = why
        self.close()
        # On stderr (tune's log): a run without its pool is slower for a reason worth seeing.
        warnings.warn(f"compile pool off: {why}; the benchmark worker compiles on its own", RuntimeWarning,
                      stacklevel=2)

    def _release(self) -> None:
        """Ask every process to drop its inputs: the worker needs the GPU's memory next."""
        for slot in self._slots:
            try:
                slot.conn.send(("release",))
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Stop the processes (idempotent); a later `warm` starts new ones unless the pool broke."""
        slots, self._slots = self._slots, []
        for slot in slots:
            try:
                slot.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for slot in slots:
            slot.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            slot.kill()


def pool_for_gpu(device_index: int, procs: int, *, timeout_s: float) -> CompilePool | None:
    """The compile pool of a benchmark worker on CUDA device `device_index`: None when `procs` is 0
    or there is nothing to compile (the Triton interpreter, no CUDA)."""
    from ..kernel.device import INTERPRET

    if procs < 1 or INTERPRET:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return CompilePool(f"cuda:{device_index}", procs, timeout_s=timeout_s)
