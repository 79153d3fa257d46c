"""Timing a GPU function: warm-up, the L2 cache flushed before every repetition, the median.

The same scheme as `triton.testing.do_bench` (CUDA events around each call, a large buffer zeroed
in between so that no repetition reads K/V left in L2 by the previous one), but with a fixed count
of repetitions so that a first pass costs a known, small amount of GPU time.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H200: 60 MB)


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
    and round-robin repetitions expose every candidate to the same drift.
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
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for _ in fns]
    for rep in range(reps):
        for fn, pairs in zip(fns, events):
            start, end = pairs[rep]
            flush.zero_()
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(flush.device)
    return [statistics.median(s.elapsed_time(e) for s, e in pairs) for pairs in events]
