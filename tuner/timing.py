"""Timing a GPU function: warm-up, the L2 cache flushed before every repetition, the median.

The same scheme as `triton.testing.do_bench` (CUDA events around each call, a large buffer zeroed
in between so that no repetition reads K/V left in L2 by the previous one), but with a fixed count
of repetitions so that a first pass costs a known, small amount of GPU time.

A call shorter than SHORT_MS is too short for one pair of events: the host's launch jitter and the
events' own resolution are of its size (two timings of one 20 µs key on an H100 were up to 290 %
apart). Such a function is timed as a batch of `launch_count` back-to-back launches between one
pair of events, captured once in a CUDA graph and replayed (no host in between), or, where capture
fails (a backend that syncs or allocates in a way graphs refuse), launched in a Python loop; its
time is the batch's over the launch count. L2: the buffer is still zeroed before each repetition,
so a batch's first launch starts cold and the others find what the previous launch left in L2 --
the time of a call in a stream of such calls (a decode loop, a layer stack of small shapes), which
is the regime where calls this short run. Every candidate of a key is timed the same way, so their
ranking compares like with like.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H200: 60 MB)
SHORT_MS = 0.05  # a call shorter than this is timed in batches of launches
BATCH_MS = 1.0  # the GPU time one batched repetition aims for: events and launch jitter ~1 % of it
MAX_LAUNCHES = 256  # launches per batch at most (a graph of more only costs capture time)


def l2_flush_buffer(device: torch.device | str) -> torch.Tensor:
    """A buffer whose zeroing evicts the L2 cache of `device`."""
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def median_ms(fn: Callable[[], object], *, warmup: int, reps: int, flush: torch.Tensor | None) -> float:
    """Median time of `fn` in ms over `reps` runs after `warmup` runs, L2 flushed before each run.

    On CUDA the runs are timed with events; on the CPU (interpreter tests) with a wall clock.
    """
    return median_ms_each([fn], warmup=warmup, reps=reps, flush=flush)[0]


def median_ms_each(fns: Sequence[Callable[[], object]], *, warmup: int, reps: int,
                   flush: torch.Tensor | None) -> list[float]:
    """Median time in ms of each of `fns`, their repetitions interleaved round-robin.

    Interleaving matters when several configs are compared: a GPU's clocks drift under sustained
    load (seen on the H200: the same config 5 % apart depending on whether it ran first or last),
    and round-robin repetitions expose every candidate to the same drift. On CUDA a function
    shorter than SHORT_MS is timed in batches of launches (`batched`; see the module's docstring).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    if flush is None or flush.device.type != "cuda":
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(reps):
            for fn, acc in zip(fns, times):
                start = time.perf_counter()
                fn()
                acc.append((time.perf_counter() - start) * 1e3)
        return [statistics.median(acc) for acc in times]
    launches = [launch_count(_one_call_ms(fn, flush)) for fn in fns]
    runners = [batched(fn, n) for fn, n in zip(fns, launches)]
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for _ in fns]
    for rep in range(reps):
        for run, pairs in zip(runners, events):
            start, end = pairs[rep]
            flush.zero_()
            start.record()
            run()
            end.record()
    torch.cuda.synchronize(flush.device)
    return [statistics.median(s.elapsed_time(e) for s, e in pairs) / n for pairs, n in zip(events, launches)]


def launch_count(call_ms: float) -> int:
    """Launches per timed repetition of a call that takes `call_ms`: 1 from SHORT_MS up, else enough
    for about BATCH_MS of GPU time (at most MAX_LAUNCHES)."""
    if call_ms >= SHORT_MS:
        return 1
    return max(2, min(MAX_LAUNCHES, math.ceil(BATCH_MS / max(call_ms, 1e-4))))


def _one_call_ms(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """The shortest of three event timings of one call, L2 flushed before each: enough to tell a
    call of microseconds from one of milliseconds."""
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def batched(fn: Callable[[], object], launches: int) -> Callable[[], object]:
    """`fn` itself for one launch; else a function that launches it `launches` times back to back:
    the replay of a CUDA graph that captured them, or a plain loop when capture fails."""
    if launches == 1:
        return fn
    graph = captured(fn, launches)
    if graph is not None:
        return graph.replay

    def loop() -> None:
        for _ in range(launches):
            fn()
    return loop


def captured(fn: Callable[[], object], launches: int) -> "torch.cuda.CUDAGraph | None":
    """A CUDA graph of `launches` calls of `fn` (captured on a side stream, as torch asks), or None
    when `fn` cannot be captured; a sticky CUDA error is raised, not swallowed."""
    from ..kernel.errors import is_sticky_cuda_error

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(launches):
                fn()
    except Exception as error:  # noqa: BLE001 - any capture failure: time the launches in a loop instead
        if is_sticky_cuda_error(error):
            raise
        return None
    finally:
        torch.cuda.current_stream().wait_stream(stream)
    return graph
