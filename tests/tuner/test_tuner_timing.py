"""Timing: short calls in batches of launches (a CUDA graph, or a loop where capture fails), long
ones one launch per pair of events; and keys sized to the GPU's real free memory. The CPU covers
the batch sizes and the wall-clock path; the rest runs on a GPU (`-m gpu`)."""
from __future__ import annotations

import pytest
import torch

from flashtune.db.types import Config, Key
from flashtune.kernel.providers import provider_config
from flashtune.tuner.bench import CAREFUL, LocalBench
from flashtune.tuner.ops import spec_of
from flashtune.tuner.timing import (BATCH_MS, MAX_LAUNCHES, SHORT_MS, batched, captured, l2_flush_buffer,
                                    launch_count, median_ms_each)


def test_launch_counts():
    assert launch_count(SHORT_MS) == 1 and launch_count(3.0) == 1
    assert launch_count(0.01) == round(BATCH_MS / 0.01)  # 10 µs: 100 launches, 1 ms a repetition
    assert launch_count(0.04) == 25
    assert launch_count(0.0) == MAX_LAUNCHES and launch_count(1e-6) == MAX_LAUNCHES
    assert launch_count(0.049) >= 2


def test_cpu_timing_is_one_call_per_repetition():
    calls = []
    times = median_ms_each([lambda: calls.append("a"), lambda: calls.append("b")], warmup=1, reps=3, flush=None)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"] and all(t >= 0 for t in times)


def _small_key_call() -> tuple[Key, object, object]:
    """A forward key of about 10 µs on an H100 and its default config's timed call."""
    key = Key("sm_90", "fwd", 512, 64, "float16", False, batch_heads=32)
    work = spec_of(key).workload(key, 32, torch.device("cuda"), 0)
    from flashtune.tuner.gpu import detect_gpu

    default = spec_of(key).default(key, detect_gpu())
    out = work.buffers()
    return key, default, (lambda: work.run(default, out=out))


@pytest.mark.gpu
def test_a_short_kernel_is_timed_by_a_graph_within_5_percent():
    key, default, call = _small_key_call()
    flush = l2_flush_buffer("cuda")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    [single] = median_ms_each([call], warmup=0, reps=1, flush=flush)
    assert single < SHORT_MS, f"the key is not short on this GPU ({single * 1e3:.1f} µs)"
    assert captured(call, 4) is not None  # Triton launches capture
    warmup, reps = CAREFUL
    for _ in range(3):  # two interleaved careful medians, as the careful pass takes them, three times
        a, b = median_ms_each([call, call], warmup=warmup, reps=reps, flush=flush)
        assert abs(a - b) / min(a, b) < 0.05, (a, b)
    # And through the harness: the careful pass's noise on the default, timed twice.
    bench = LocalBench("cuda")
    [m] = list(bench.measure(key, 32, [default], careful=True))
    assert m.outcome == "ok" and m.noise is not None and m.noise < 0.05, m


@pytest.mark.gpu
def test_sdpa_providers_are_timed_graph_or_not():
    key = Key("sm_90", "fwd", 256, 64, "float16", False, batch_heads=16)
    work = spec_of(key).workload(key, 16, torch.device("cuda"), 0)
    flush = l2_flush_buffer("cuda")
    for provider in ("sdpa_flash", "sdpa_efficient", "sdpa_math"):
        config = provider_config(provider)
        call = lambda: work.run(config)  # noqa: E731 - SDPA allocates its own output
        try:
            call()
        except RuntimeError:
            continue  # this torch or GPU refuses the backend
        run = batched(call, 8)
        run()
        [ms] = median_ms_each([call], warmup=2, reps=20, flush=flush)
        assert 0 < ms < 1.0, (provider, ms)


@pytest.mark.gpu
def test_a_64k_prefill_key_is_measured_not_a_harness_failure():
    """The key that once stopped `tune --recorded` with a 16 GiB allocation in its reference."""
    key = Key("sm_90", "fwd", 65536, 128, "bfloat16", True, batch_heads=16)
    from flashtune.tuner.gpu import detect_gpu

    default = spec_of(key).default(key, detect_gpu())
    bench = LocalBench("cuda", quick=(1, 3))
    [m] = list(bench.measure(key, 16, [default], careful=False))
    assert m.outcome == "ok", m


@pytest.mark.gpu
def test_a_bucket_too_big_for_the_gpu_runs_on_fewer_sequences():
    key = Key("sm_90", "fwd", 16384, 128, "float16", True, batch_heads=16 * 1024)  # 1024 sequences: ~400 GB
    from flashtune.tuner.gpu import detect_gpu

    default = spec_of(key).default(key, detect_gpu())
    bench = LocalBench("cuda", quick=(1, 3))
    [m] = list(bench.measure(key, key.batch_heads, [default], careful=False))
    assert m.outcome == "ok", m
    assert m.batch_heads is not None and 16 <= m.batch_heads < key.batch_heads and m.batch_heads % 16 == 0
    free, _ = torch.cuda.mem_get_info()
    assert free > 0


@pytest.mark.gpu
def test_a_key_whose_one_sequence_does_not_fit_is_out_of_memory():
    key = Key("sm_90", "fwd", 1 << 24, 256, "float32", False, batch_heads=16)  # 16M tokens: 256 GB a tensor
    bench = LocalBench("cuda")
    configs = [Config(64, 64, 4, 2), Config(128, 64, 8, 2)]
    results = list(bench.measure(key, 16, configs, careful=False))
    assert [m.outcome for m in results] == ["out_of_memory"] * 2
    assert "GiB free" in results[0].error
