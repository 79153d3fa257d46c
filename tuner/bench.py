"""The benchmark harness for one key: compile, validate and time configs on the key's op workload.

The workload (inputs, launch, reference check) comes from the key's op (tuner.ops): the forward's
KeyInputs, the backward's gradients, ...; the harness itself names no op.

`LocalBench` runs in the process that owns the GPU: the worker process in production
(tuner.worker), or the test process itself under the Triton interpreter. A config's first launch
compiles it, or, when the worker's compile pool (tuner.compile_pool) compiled it just before, loads
it from Triton's cache; first launches of a batch run in threads, which overlap the LLVM and ptxas
steps (they release the GIL) but not Triton's Python and MLIR stages: hence the pool's processes.
Either way the first launch here decides the trial's outcome.

Each key's workload is sized to the device's free memory (`fit_workload`): the batch B of B·Hq
shrinks until two workloads (the careful pass's second input lives beside the first) fit, and the
reference is computed in chunks of what is left. A key that cannot fit even at B = 1, or whose
workload runs out of memory anyway, gets an `out_of_memory` trial for every config asked for; the
run goes on with the next key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch

from ..db.types import Config, Key
from ..kernel.providers import KERNEL, provider_of
from ..kernel.sdpa import is_refusal
from ..kernel.testing import REFERENCE_BYTES, tflops as rate
from ..kernel.errors import is_sticky_cuda_error, launch_failure, trial_error_text

from .measure import Measurement
from .ops import spec_of
from .ops.inputs import poisoned
from .ops.spec import Workload
from .timing import l2_flush_buffer, median_ms_each

FILL_TOKENS = 1 << 17  # B·H·N of the default benchmark input: enough work for several waves
FILL_WAVES = 2  # at least this many waves of programs for the largest query tile (256)
QUICK = (2, 5)  # (warm-up, repetitions) of the first pass
CAREFUL = (10, 50)  # of the careful timing of the survivors
# Of the free memory, what a key's workloads may hold: the rest is for the kernels' scratch, SDPA
# backends' own buffers and the allocator's slack.
MEMORY_FRACTION = 0.85
WORKLOADS = 2  # workloads alive at once: the careful pass revalidates on a second input beside the first
REFERENCE_MIN_BYTES = 64 << 20  # the least chunk budget a reference is left; below it the key does not fit
MEMORY_ENV = "FLASHTUNE_BENCH_MEMORY"  # bytes: the free memory a LocalBench assumes instead of asking the device
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the CUDA one


class DoesNotFit(RuntimeError):
    """A key's workload does not fit the free memory even with its batch cut to one sequence."""


@dataclasses.dataclass(frozen=True)
class Fit:
    """How a key's workload is sized: the B·Hq it runs and the reference's chunk budget (None: no limit)."""

    batch_heads: int
    reference_bytes: int | None


def fit_workload(key: Key, batch_heads: int, free_bytes: int | None, device_type: str = "cuda") -> Fit:
    """The largest batch B' <= B (B·Hq = `batch_heads`, split by the key's op inputs) whose WORKLOADS
    workloads (OpInputs.footprint) and a reference chunk of REFERENCE_MIN_BYTES fit MEMORY_FRACTION of
    `free_bytes`, with Hq kept; the reference gets what is left (at most REFERENCE_BYTES). None free
    bytes: no limit. DoesNotFit, naming the bytes, when even B' = 1 does not fit."""
    if free_bytes is None:
        return Fit(batch_heads, None)
    inputs = spec_of(key).inputs
    usable = int(free_bytes * MEMORY_FRACTION)
    budget = REFERENCE_BYTES.get(device_type, REFERENCE_BYTES["cpu"])
    batch, heads_q, _ = inputs.sizes(key, batch_heads)
    held = 0
    for b in range(batch, 0, -1):  # footprint is linear in B: the first that fits is the largest
        bh = batch_heads if b == batch else b * heads_q
        held = WORKLOADS * inputs.footprint(key, bh)
        if held + REFERENCE_MIN_BYTES <= usable:
            return Fit(bh, min(budget, usable - held))
    raise DoesNotFit(f"out of memory: the workload needs {_gib(held + REFERENCE_MIN_BYTES)} GiB even at batch 1 "
                     f"(B·Hq {heads_q}), {_gib(free_bytes)} GiB free")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g}"


def memory_limit_from_env() -> int | None:
    """FLASHTUNE_BENCH_MEMORY (bytes) if set; ValueError naming it for anything but a positive integer."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MEMORY_ENV}={text!r}: expected a positive number of bytes")
    return int(text)


def fill_batch_heads(seq_len: int, sm_count: int) -> int:
    """B·H for benchmark inputs of length `seq_len`: ~FILL_TOKENS tokens and enough programs for the SMs."""
    by_tokens = math.ceil(FILL_TOKENS / seq_len)
    by_waves = math.ceil(FILL_WAVES * max(sm_count, 1) / math.ceil(seq_len / 256))
    return max(1, by_tokens, by_waves)


def tflops(key: Key, batch_heads: int, ms: float) -> float:
    """TFLOP/s of one call of the key's op on (key, batch_heads) that took `ms` (its OpSpec's FLOPs)."""
    return rate(spec_of(key).flops(key, batch_heads), ms)


def classify_compile_error(error: BaseException) -> str:
    """The trial outcome for an exception raised by a config's first launch: `out_of_memory` for
    torch's out-of-memory error, kernel.errors' classification, and `compile_error` for anything else
    (the config did not produce a result)."""
    if isinstance(error, OutOfMemory):
        return "out_of_memory"
    return launch_failure(error) or "compile_error"


class LocalBench:
    """A Bench running in this process on `device` (a CUDA GPU, or the CPU under TRITON_INTERPRET=1).

    A sticky CUDA error is reported as a `crashed` measurement and then re-raised as CudaContextLost
    so that the owner (the worker) can replace the process. `workload(key, batch_heads, device, seed)`
    draws a key's inputs and reference, the reference in chunks of at most `reference_bytes`
    (default: the key's op spec, tuner.ops); tests pass one that wraps the op's, e.g. to give a
    config's launches a fault. `memory_bytes`: the free memory to size workloads by (`fit_workload`)
    instead of the device's (torch.cuda.mem_get_info; none on the CPU); default: FLASHTUNE_BENCH_MEMORY.
    """

    def __init__(self, device: torch.device | str, *, compile_threads: int = 1, seed: int = 0,
                 quick: tuple[int, int] = QUICK, careful: tuple[int, int] = CAREFUL,
                 workload: Callable[..., Workload] | None = None, memory_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.compile_threads = max(1, compile_threads)
        self.seed = seed
        self.quick, self.careful = quick, careful
        self.memory_bytes = memory_bytes if memory_bytes is not None else memory_limit_from_env()
        self._inputs: Workload | None = None
        self._asked: tuple[Key, int] | None = None  # the (key, B·Hq) `_inputs` were sized for
        self._fit = Fit(0, None)
        self._make_workload = workload
        self._flush = l2_flush_buffer(self.device) if self.device.type == "cuda" else None

    def _workload(self, key: Key, batch_heads: int, seed: int) -> Workload:
        budget = self._fit.reference_bytes
        if self._make_workload is not None:
            return self._make_workload(key, batch_heads, self.device, seed, reference_bytes=budget)
        return spec_of(key).workload(key, batch_heads, self.device, seed, reference_bytes=budget)

    def _free_bytes(self) -> int | None:
        if self.memory_bytes is not None:
            return self.memory_bytes
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return None

    def _release(self) -> None:
        """Drop the current workload and hand its memory back to the device."""
        self._inputs, self._asked = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _inputs_for(self, key: Key, batch_heads: int) -> Workload:
        """The key's workload at `batch_heads`, or at a smaller batch when the free memory asks for it
        (`fit_workload`; halved again on an out-of-memory error while drawing it). DoesNotFit when
        even one sequence does not fit."""
        if self._inputs is not None and self._asked == (key, batch_heads):
            return self._inputs
        self._release()  # free the previous key's tensors before measuring what is free
        self._fit = fit_workload(key, batch_heads, self._free_bytes(), self.device.type)
        while True:
            try:
                self._inputs = self._workload(key, self._fit.batch_heads, self.seed)
                break
            except OutOfMemory as error:
                self._release()
                batch, heads_q, _ = spec_of(key).inputs.sizes(key, self._fit.batch_heads)
                if batch == 1:
                    raise DoesNotFit(f"out of memory drawing the workload at batch 1: {trial_error_text(error)}"
                                     ) from error
                budget = self._fit.reference_bytes
                self._fit = Fit(batch // 2 * heads_q, budget // 2 if budget is not None else None)
        self._asked = (key, batch_heads)
        return self._inputs

    def _first_launch(self, inputs: Workload, config: Config) -> tuple[Any, float, BaseException | None]:
        start = time.perf_counter()
        try:
            out, _ = inputs.run(config, out=poisoned(inputs.buffers()))
            return out, time.perf_counter() - start, None
        except Exception as error:  # noqa: BLE001 - ptxas, LLVM and launch failures are all trial outcomes
            return None, time.perf_counter() - start, error

    def measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                careful: bool) -> Iterator[Measurement]:
        """Compile, validate and time `configs`. The first pass times each config as it comes; the
        careful pass times all valid configs together, repetitions interleaved (see median_ms_each),
        the first one twice: its Measurement carries the pass's `noise`. Run on a smaller batch than
        `batch_heads` (the free memory's), each Measurement says which (`batch_heads`); a key that does
        not fit, or runs out of memory outside a config's own launch, gives every config not yet
        measured an `out_of_memory` Measurement with the reason."""
        done: set[Config] = set()
        try:
            for m in self._measure(key, batch_heads, configs, careful=careful):
                done.add(m.config)
                ran = self._fit.batch_heads
                yield dataclasses.replace(m, batch_heads=ran) if ran != batch_heads else m
        except (DoesNotFit, OutOfMemory) as error:
            text = str(error) if isinstance(error, DoesNotFit) else f"out of memory: {trial_error_text(error)}"
            self._release()
            for config in dict.fromkeys(configs):
                if config not in done:
                    yield Measurement(config, "out_of_memory", error=text)

    def _measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                 careful: bool) -> Iterator[Measurement]:
        inputs = self._inputs_for(key, batch_heads)
        batch_heads = self._fit.batch_heads
        warmup, reps = self.careful if careful else self.quick
        ready: list[tuple[Config, float]] = []
        for config, out, compile_s, error in self._first_launches(inputs, configs):
            failed = self._check(inputs, config, out, compile_s, error)
            if failed is not None:
                yield failed
            elif careful:
                ready.append((config, compile_s))
            else:
                [ms] = self._time(inputs, [config], warmup, reps)
                yield Measurement(config, "ok", median_ms=ms, compile_s=compile_s)
        if ready:
            ready = list(self._revalidated(key, batch_heads, ready))
            yield from (m for m in ready if isinstance(m, Measurement))
            ready = [r for r in ready if not isinstance(r, Measurement)]
        if ready:
            # The first config (the loop puts the default there) is timed twice, as two interleaved
            # entries: how far apart its two medians land is the noise of this very pass.
            configs = [c for c, _ in ready]
            times = self._time(inputs, [*configs, configs[0]], warmup, reps)
            noise = abs(times[0] - times[-1]) / min(times[0], times[-1]) if min(times[0], times[-1]) > 0 else None
            for i, ((config, compile_s), ms) in enumerate(zip(ready, times)):
                yield Measurement(config, "ok", median_ms=ms, compile_s=compile_s, noise=noise if i == 0 else None)

    def _revalidated(self, key: Key, batch_heads: int, ready: Sequence[tuple[Config, float]]
                     ) -> Iterator[tuple[Config, float] | Measurement]:
        """The careful pass's candidates checked once more on a second random input (another seed)
        before any of them can be timed, stored or win: a miscompile that happens to pass on one
        input (a race, a wrong mask on some rows) is caught here. Each comes back as it was, or as a
        `wrong_result` Measurement."""
        second = self._workload(key, batch_heads, self.seed + 1)
        try:
            for config, compile_s in ready:
                try:
                    out, _ = second.run(config, out=poisoned(second.buffers()))
                    self._sync([config])
                except Exception as error:  # noqa: BLE001 - it ran on the first input: any failure now is wrong
                    if is_sticky_cuda_error(error):
                        raise CudaContextLost([config], error) from error
                    if isinstance(error, OutOfMemory):
                        yield Measurement(config, "out_of_memory", compile_s=compile_s,
                                          error=f"second input: {trial_error_text(error)}")
                        continue
                    yield Measurement(config, "wrong_result", compile_s=compile_s,
                                      error=f"second input: {trial_error_text(error)}")
                    continue
                failed = self._check(second, config, out, compile_s, None)
                if failed is not None:
                    yield Measurement(config, "wrong_result", compile_s=compile_s,
                                      error=f"second input (seed {self.seed + 1}): {failed.error}")
                else:
                    yield config, compile_s
        finally:
            del second

    def _first_launches(self, inputs: Workload, configs: Sequence[Config]
                        ) -> Iterator[tuple[Config, Any, float, BaseException | None]]:
        step = self.compile_threads
        for lo in range(0, len(configs), step):
            chunk = list(configs[lo:lo + step])
            if len(chunk) > 1:
                with ThreadPoolExecutor(len(chunk)) as pool:
                    firsts = list(pool.map(lambda c: self._first_launch(inputs, c), chunk))
            else:
                firsts = [self._first_launch(inputs, chunk[0])]
            self._sync(chunk)
            for config, (out, compile_s, error) in zip(chunk, firsts):
                if error is not None and len(chunk) > 1 and classify_compile_error(error) == "compile_error":
                    # Alone this time: an error that only shows up under concurrent compiles is not the config's.
                    out, compile_s, error = self._first_launch(inputs, config)
                    self._sync([config])
                yield config, out, compile_s, error

    def _sync(self, chunk: Sequence[Config]) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError as error:
            if is_sticky_cuda_error(error):
                raise CudaContextLost(chunk, error) from error
            raise

    def _check(self, inputs: Workload, config: Config, out: Any, compile_s: float,
               error: BaseException | None) -> Measurement | None:
        """The failed measurement of a config whose first launch failed or was wrong; None if it is good."""
        text = trial_error_text(error) if error is not None else None
        provider = provider_of(config)
        if error is not None and provider != KERNEL:
            # An SDPA backend that declines these inputs (head dim, dtype, device) is no candidate here.
            why = f"torch refused the {provider} backend" if is_refusal(error) else f"torch SDPA {provider} failed"
            text = f"{why}: {text}"
        if error is not None or out is None:
            outcome = classify_compile_error(error) if error is not None else "compile_error"
            if outcome == "crashed" and error is not None:
                raise CudaContextLost([config], error)
            return Measurement(config, outcome, compile_s=compile_s, error=text)
        problem = inputs.check(out)
        if problem is not None:
            return Measurement(config, "wrong_result", compile_s=compile_s, error=problem)
        return None

    def _time(self, inputs: Workload, configs: Sequence[Config], warmup: int, reps: int) -> list[float]:
        buffer = inputs.buffers()
        fns = [lambda c=c: inputs.run(c, out=buffer) for c in configs]
        try:
            return median_ms_each(fns, warmup=warmup, reps=reps, flush=self._flush)
        except RuntimeError as run_error:
            if is_sticky_cuda_error(run_error):
                raise CudaContextLost(list(configs), run_error) from run_error
            raise

    def close(self) -> None:
        self._inputs, self._asked = None, None
        self._flush = None


class CudaContextLost(RuntimeError):
    """A sticky CUDA error while benchmarking `configs`; this process can no longer use the GPU."""

    def __init__(self, configs: Sequence[Config], error: BaseException) -> None:
        self.configs = list(configs)
        self.error_text = trial_error_text(error)
        super().__init__(f"CUDA context lost while running {', '.join(map(str, self.configs))}: {self.error_text}")
