"""Host time per call, shared by the host-path benchmarks (dispatch_bench.py, host_bench.py)."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def loop_times(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(host µs/call, wall µs/call) of `calls` back-to-back calls: the host figure stops the clock before the
    final synchronisation, so it is what the CPU spent issuing the calls."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6
