"""The compile pool (tuner.compile_pool) and the compile-pool inputs of every op.

On the CPU the pool's processes run under the Triton interpreter, which compiles nothing, so these
tests check the plumbing for real (spawned processes that build each key's compile-pool inputs,
launch each config and report; replacement of a killed or hung process; the worker still deciding
every trial) and, with Triton's interpreter pre-run hooks, that the compile-pool inputs pass every
kernel the arguments Triton specialises on exactly as the full workload does.
"""
from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from flashtune.db.types import Config, Key
from flashtune.kernel.jit import bwd as bwd_kernels, decode as decode_kernels, fwd as fwd_kernels
from flashtune.kernel.jit import fwd_tma
from flashtune.kernel.device import INTERPRET
from flashtune.kernel.ops.fwd_tma import tma_config
from flashtune.tuner.compile_pool import CompilePool, pool_for_gpu
from flashtune.tuner.fleet.gpus import compile_share, usable_cores
from flashtune.tuner.ops import spec_of
from flashtune.tuner.bench import LocalBench
from flashtune.tuner.worker import WorkerBench
from flashtune.tuner.ops.inputs import compile_batch

# The CPU tests' pools launch on CPU tensors, which only the interpreter runs.
interpreted = pytest.mark.skipif(not INTERPRET, reason="CPU pools need the Triton interpreter")

# Keys without a bucket, timed at B·Hq = BH = 6 sequences of 16 heads: the compile-pool inputs have
# compile_batch(6) = 2 (a bucketed key's B·Hq is a power of two: its B shrinks only above 16).
BH = 96
FWD = Key("sm_90", "fwd", seq_len=16, head_dim=16, dtype="float16", causal=True)
GOOD = [Config(16, 16, 1, 1), Config(16, 16, 2, 1)]
BAD = Config(16, 16, 1, 1, (("bogus", 1),))  # a knob the kernel does not know: the launch raises


def test_compile_batch_keeps_what_triton_specialises_on():
    assert [compile_batch(b) for b in (1, 2, 3, 4, 5, 6, 12, 16, 48, 96, 128, 7)] == [1, 2, 3, 4, 3, 2, 4, 16, 16, 16,
                                                                                     16, 3]
    for b in range(1, 200):
        small = compile_batch(b)
        assert small <= b and (small == 1) == (b == 1)
        for x in range(1, 40):  # any product B·x with x independent of B
            assert (small * x) % 16 == 0 if (b * x) % 16 == 0 else (small * x) % 16 != 0
    with pytest.raises(ValueError):
        compile_batch(0)


def _spec(value: Any) -> Any:
    """What Triton's JIT specialises an argument on (3.6 and 3.9): ints on == 1, % 16 and width."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, value >= 2**31)
    if isinstance(value, float):
        return "float"
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    return type(value).__name__


def _kernels() -> list[Any]:
    from triton.runtime.interpreter import InterpretedFunction

    return [k for module in (fwd_kernels, fwd_tma, bwd_kernels, decode_kernels) for k in vars(module).values()
            if isinstance(k, InterpretedFunction)]


def _launch_specs(workload: Any, config: Config) -> list[tuple[str, tuple[Any, ...]]]:
    """The specialisation of every kernel launch `workload.run(config)` makes, in order."""
    seen: list[tuple[str, tuple[Any, ...]]] = []
    hooks = []
    for kernel in _kernels():
        def hook(*args: Any, _name: str = kernel.__name__, **kwargs: Any) -> None:
            seen.append((_name, tuple(map(_spec, args)) + tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))))
        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    try:
        workload.run(config)
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
    return seen


WARM_CASES = [
    (FWD, GOOD[0]),
    (FWD, tma_config(16, 16, 1, 1, schedule="persistent")),
    (FWD, tma_config(16, 16, 1, 1, schedule="grid")),
    (Key("sm_90", "bwd", seq_len=16, head_dim=16, dtype="float16", causal=True, group=2),
     Config(16, 16, 1, 1, (("block_m_dq", 16), ("block_n_dq", 16), ("deterministic", False),
                           ("num_stages_dq", 1), ("num_warps_dq", 1)))),
    (Key("sm_90", "kvcache", seq_len=1, seq_len_kv=64, head_dim=16, dtype="float16", causal=False, group=4),
     Config(16, 16, 1, 1, (("num_splits", 2),))),
]


@interpreted
@pytest.mark.parametrize("key, config", WARM_CASES, ids=lambda v: str(v))
def test_compile_pool_inputs_compile_like_the_workload(key, config):
    spec = spec_of(key)
    full = spec.workload(key, BH, torch.device("cpu"), 0)
    warm = spec.warm_workload(key, BH, torch.device("cpu"))
    assert warm.q.shape[0] < full.q.shape[0] and warm.q.shape[1:] == full.q.shape[1:]
    assert warm.reference is None
    specs = _launch_specs(full, config)
    assert specs and _launch_specs(warm, config) == specs


@interpreted
def test_the_specialisation_check_sees_what_a_naive_cut_would_change():
    # 16 sequences of 15 heads (G=5): the persistent TMA kernel's work count B·15·blocks is divisible
    # by 16; cut to one sequence it is not, and Triton would compile another binary. compile_batch
    # keeps 16 here, and the check above would catch a cut that changed it.
    key = Key("sm_90", "fwd", seq_len=16, head_dim=16, dtype="float16", causal=True, group=5)
    config = tma_config(16, 16, 1, 1, schedule="persistent")
    build = spec_of(key).workload
    assert build(key, 240, torch.device("cpu"), 0).q.shape[:2] == (16, 15)
    assert _launch_specs(build(key, 15, torch.device("cpu"), 0), config) != _launch_specs(
        build(key, 240, torch.device("cpu"), 0), config)
    assert spec_of(key).warm_workload(key, 240, torch.device("cpu")).q.shape[0] == 16


@interpreted
def test_pool_runs_each_config_and_reports_its_outcome():
    pool = CompilePool("cpu", 2, timeout_s=120)
    try:
        results = pool.warm(FWD, BH, [*GOOD, BAD])
        assert {c: r.outcome for c, r in results.items()} == {GOOD[0]: "ok", GOOD[1]: "ok", BAD: "error"}
        assert "bogus" in results[BAD].error
        assert all(r.seconds > 0 for r in results.values())
        assert len(set(pool.pids())) == 2 and os.getpid() not in pool.pids()
        # Another op's key in the same processes: they drop the last key's inputs and build the new ones.
        key, config = WARM_CASES[-1]
        assert pool.warm(key, BH, [config])[config].outcome == "ok"
    finally:
        pool.close()
    assert pool.pids() == []


@interpreted
def test_a_killed_process_is_replaced_and_the_batch_still_warms():
    pool = CompilePool("cpu", 2, timeout_s=120)
    try:
        pool.warm(FWD, BH, GOOD)
        victim = pool.pids()[0]
        os.kill(victim, 9)
        time.sleep(0.2)
        results = pool.warm(FWD, BH, GOOD)
        assert [r.outcome for r in results.values()] == ["ok", "ok"]
        assert pool.restarts == 1 and victim not in pool.pids() and len(pool.pids()) == 2
    finally:
        pool.close()


@interpreted
def test_a_hung_warm_up_is_killed_and_replaced():
    # A timeout far below one interpreted launch (building inputs and running a kernel): every
    # config times out, its process is killed and replaced, and the pool goes on.
    pool = CompilePool("cpu", 1, timeout_s=0.02)
    try:
        results = pool.warm(FWD, BH, GOOD)
        assert [r.outcome for r in results.values()] == ["timeout", "timeout"]
        assert "killed" in results[GOOD[0]].error
        assert pool.restarts == 2 and len(pool.pids()) == 1
        pool.timeout_s = 120
        assert pool.warm(FWD, BH, GOOD[:1])[GOOD[0]].outcome == "ok"
    finally:
        pool.close()


@interpreted
def test_a_pool_that_cannot_start_turns_itself_off():
    pool = CompilePool("no-such-device", 2)
    with pytest.warns(RuntimeWarning, match="compile pool off"):
        results = pool.warm(FWD, BH, GOOD)
    assert [r.outcome for r in results.values()] == ["skipped", "skipped"]
    assert "could not start" in pool.broken and pool.pids() == []
    assert pool.warm(FWD, BH, GOOD)[GOOD[0]].error == pool.broken


def quick_bench() -> LocalBench:
    """The worker's LocalBench on the CPU (the interpreter), one repetition per timing."""
    return LocalBench(torch.device("cpu"), compile_threads=1, quick=(0, 1), careful=(0, 1))


@interpreted
def test_worker_with_a_pool_still_decides_every_trial():
    pool = CompilePool("cpu", 2, timeout_s=120)
    bench = WorkerBench(trial_timeout_s=120, factory=quick_bench, factory_args=(), pool=pool)
    try:
        measured = list(bench.measure(FWD, BH, [GOOD[0], BAD, GOOD[1]], careful=False))
        # The config the pool could not compile goes last in the first pass (the worker compiles it itself).
        assert [m.config for m in measured] == [*GOOD, BAD]
        results = {m.config: m for m in measured}
        assert results[GOOD[0]].outcome == results[GOOD[1]].outcome == "ok"
        assert results[BAD].outcome == "compile_error" and "bogus" in results[BAD].error
        assert bench.warm_s > 0
        pids = pool.pids()
        # The careful pass of the same key: its configs were warmed already, the pool is not asked.
        warm_s = bench.warm_s
        assert [m.outcome for m in bench.measure(FWD, BH, GOOD, careful=True)] == ["ok", "ok"]
        assert bench.warm_s == warm_s
    finally:
        bench.close()
    assert pids and pool.pids() == []  # closing the worker stops its pool


@interpreted
def test_no_pool_where_nothing_compiles():
    assert pool_for_gpu(0, 8, timeout_s=60) is None  # the interpreter
    assert pool_for_gpu(0, 0, timeout_s=60) is None


def test_cores_are_divided_between_gpu_workers():
    cores = usable_cores()
    assert compile_share() == max(1, min(16, cores))
    assert compile_share(2) == max(1, min(16, cores // 2))
    assert compile_share(10 * cores) == 1


def _first_launch_seconds(tmp_path, name: str, procs: int) -> list[float]:
    """compile_s of a CUDA worker's first pass over a few configs with an empty Triton cache, with a
    compile pool of `procs` processes (0: none)."""
    from flashtune.kernel.device import device_arch

    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / name)  # the spawned processes inherit it
    key = Key(device_arch(0), "fwd", seq_len=512, head_dim=64, dtype="float16", causal=True, batch_heads=16)
    configs = [Config(64, 32, 4, 2), Config(64, 32, 4, 3), Config(128, 32, 4, 2), Config(64, 64, 4, 2)]
    bench = WorkerBench(compile_threads=4, pool=pool_for_gpu(0, procs, timeout_s=300))
    try:
        measured = list(bench.measure(key, 16, configs, careful=False))
    finally:
        bench.close()
    assert [m.outcome for m in measured] == ["ok"] * len(configs)
    return sorted(m.compile_s for m in measured)


@pytest.mark.gpu
def test_cuda_pool_leaves_the_worker_only_loading_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))  # restored afterwards
    threads = _first_launch_seconds(tmp_path, "threads", 0)
    pooled = _first_launch_seconds(tmp_path, "pooled", 2)
    # A compile takes seconds; loading a cached kernel, a few milliseconds (the first launch in the
    # worker also builds Triton's launcher, found in the same cache).
    assert pooled[len(pooled) // 2] < 0.5 * threads[len(threads) // 2], (pooled, threads)
