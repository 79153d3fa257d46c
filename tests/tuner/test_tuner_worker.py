"""The restartable benchmark worker: real spawned processes that crash, hang and lose their context."""
from __future__ import annotations

import os
import time

import pytest

from flashtune.db.types import Config, Key
from flashtune.tuner.measure import FunctionBench
from flashtune.tuner.worker import WorkerBench

KEY = Key("sm_90", "fwd", 256, 64, "float16", False)
CRASH, HANG, LOST = Config(64, 64, 4, 5), Config(64, 64, 4, 6), Config(64, 64, 4, 4)
GOOD = [Config(64, 64, 4, 2), Config(64, 64, 4, 3), Config(128, 64, 4, 2)]


class _FaultyBench(FunctionBench):
    """Runs inside the worker: kills its process, hangs, or reports a lost CUDA context for some configs."""

    def __init__(self) -> None:
        super().__init__(self._cost)

    @staticmethod
    def _cost(key, config, careful):
        if config == CRASH:
            os._exit(7)  # like a segfault in the driver: no reply, the pipe just closes
        if config == HANG:
            time.sleep(600)
        if config == LOST:
            from flashtune.tuner.bench import CudaContextLost

            raise CudaContextLost([config], RuntimeError("CUDA error: an illegal memory access was encountered"))
        return float(config.block_m + config.num_stages)


def faulty_bench() -> _FaultyBench:
    return _FaultyBench()


def test_crash_hang_and_lost_context_are_trials_and_the_worker_restarts():
    bench = WorkerBench(trial_timeout_s=5, factory=faulty_bench, factory_args=())
    try:
        configs = [GOOD[0], CRASH, GOOD[1], HANG, LOST, GOOD[2]]
        results = {m.config: m for m in bench.measure(KEY, 4, configs, careful=False)}
        assert set(results) == set(configs)
        assert results[CRASH].outcome == "crashed" and "exit code 7" in results[CRASH].error
        assert results[HANG].outcome == "timeout"
        assert results[LOST].outcome == "crashed" and "illegal memory access" in results[LOST].error
        for c in GOOD:
            assert results[c].outcome == "ok" and results[c].median_ms == c.block_m + c.num_stages
        assert bench.restarts >= 3
        # After all that the worker still serves requests.
        again = list(bench.measure(KEY, 4, GOOD[:1], careful=True))
        assert [m.outcome for m in again] == ["ok"]
    finally:
        bench.close()


class _ChattyBench(FunctionBench):
    """Prints to stdout inside the worker, as Triton does with a whole PTX listing when ptxas fails."""

    def __init__(self) -> None:
        super().__init__(self._cost)

    @staticmethod
    def _cost(key, config, careful):
        print("ptxas fatal : Insufficient registers // PTX listing follows", flush=True)
        return 1.0


def chatty_bench() -> _ChattyBench:
    return _ChattyBench()


def test_worker_output_never_reaches_stdout(capfd):
    bench = WorkerBench(trial_timeout_s=30, factory=chatty_bench, factory_args=())
    try:
        assert [m.outcome for m in bench.measure(KEY, 4, GOOD[:1], careful=False)] == ["ok"]
    finally:
        bench.close()
    out, err = capfd.readouterr()
    assert "ptxas fatal" not in out  # stdout carries `tune --json` and nothing else
    assert "ptxas fatal" not in err  # and the terminal a progress bar


@pytest.mark.gpu
def test_cuda_worker_measures_real_configs():
    bench = WorkerBench(compile_threads=2)
    try:
        configs = [Config(64, 64, 4, 2), Config(128, 64, 8, 3)]
        results = list(bench.measure(KEY, 16, configs, careful=False))
        assert sorted(str(m.config) for m in results) == sorted(map(str, configs))
        assert all(m.outcome == "ok" and m.median_ms > 0 and m.compile_s > 0 for m in results)
    finally:
        bench.close()
