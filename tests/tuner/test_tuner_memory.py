"""Keys sized to the GPU's free memory: a smaller batch when the bucket's does not fit, an
`out_of_memory` trial when not even one sequence does, and the run goes on with the next key. The
free memory is given to the bench (its constructor, or FLASHTUNE_BENCH_MEMORY for the worker)
instead of asked of a GPU; the kernels run under the interpreter against a real SQLite file."""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel.testing import attention_reference, fp32_reference
from flashtune.tuner.bench import (MEMORY_ENV, MEMORY_FRACTION, REFERENCE_MIN_BYTES, WORKLOADS, DoesNotFit,
                                   LocalBench, fit_workload)
from flashtune.tuner.loop import Tuner
from flashtune.tuner.ops import spec_of
from flashtune.tuner.ops.bwd import fp32_gradients

SMALL = [Config(16, 16, 2, 1), Config(32, 16, 2, 2)]
FITS_A = Key("sm_90", "fwd", 16, 16, "float32", True, batch_heads=2)
FITS_C = Key("sm_90", "fwd", 32, 16, "float32", False, batch_heads=2)
TOO_BIG = Key("sm_90", "fwd", 65536, 128, "float16", True, batch_heads=64)  # GiBs of inputs: never drawn
ROOM = 100 << 20  # the free memory given: the small keys and a reference chunk fit, TOO_BIG does not
KV = "v" * 12


def _need(key: Key, batch_heads: int) -> int:
    """The free memory a workload of `key` at `batch_heads` needs (the bench's own model)."""
    return math.ceil((WORKLOADS * spec_of(key).inputs.footprint(key, batch_heads) + REFERENCE_MIN_BYTES)
                     / MEMORY_FRACTION)


def _tuner(tmp_path, bench) -> tuple[Store, Tuner]:
    store = Store.open(f"sqlite:///{tmp_path / 'memory.db'}")
    run = store.start_run(RunInfo("cpu-interpreter", "sm_90", 1, 232448, "", "", "", "", KV, "h", {}))
    tuner = Tuner(store, run, bench, kernel_version=KV, gpu_name="cpu-interpreter",
                  space=lambda k: SMALL, default=lambda k: SMALL[0], batch_heads=lambda k: k.batch_heads)
    return store, tuner


def _check_three_keys(store: Store, results) -> None:
    assert [r.key for r in results] == [FITS_A, TOO_BIG, FITS_C]  # the order given: the big one is in the middle
    big = results[1]
    assert big.winner is None and big.outcomes == {"out_of_memory": len(SMALL)}
    trials = store.trials(TOO_BIG)
    assert {t.config for t in trials} == set(SMALL)
    assert all(t.outcome == "out_of_memory" and "memory" in t.error and "GiB" in t.error for t in trials)
    for r in (results[0], results[2]):
        assert r.winner is not None and r.winner.config in SMALL and r.shrunk_from is None
        assert {t.outcome for t in store.trials(r.key)} == {"ok"}
    assert {w.key for w in store.winners("sm_90")} == {FITS_A, FITS_C}


def test_a_key_too_big_for_memory_is_an_out_of_memory_trial_and_the_run_goes_on(tmp_path, kernel_device):
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), memory_bytes=ROOM)
    store, tuner = _tuner(tmp_path, bench)
    results = tuner.run([FITS_A, TOO_BIG, FITS_C], keep_order=True)
    _check_three_keys(store, results)
    # A later run with room for it tries the out_of_memory configs again (memory depends on what else
    # holds the GPU), and nothing else.
    roomy = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), memory_bytes=ROOM)
    again = Tuner(store, tuner.run_id, roomy, kernel_version=KV, gpu_name="cpu-interpreter",
                  space=lambda k: SMALL, default=lambda k: SMALL[0], batch_heads=lambda k: k.batch_heads)
    [a, big, c] = again.run([FITS_A, TOO_BIG, FITS_C], keep_order=True)
    assert (a.new_trials, c.new_trials) == (0, 0) and big.new_trials == len(SMALL)
    store.close()


def test_the_worker_sizes_keys_by_the_memory_env_and_goes_on(tmp_path, monkeypatch):
    from flashtune.tuner.worker import WorkerBench

    if torch.cuda.is_available():
        pytest.skip("the CPU worker runs under the interpreter only")
    monkeypatch.setenv(MEMORY_ENV, str(ROOM))  # the spawned worker inherits it
    bench = WorkerBench(compile_threads=1, trial_timeout_s=120)
    try:
        store, tuner = _tuner(tmp_path, bench)
        results = tuner.run([FITS_A, TOO_BIG, FITS_C], keep_order=True)
        _check_three_keys(store, results)
        store.close()
    finally:
        bench.close()


def test_a_key_that_fits_with_fewer_sequences_is_tuned_on_them(tmp_path, kernel_device):
    key = Key("sm_90", "fwd", 16, 16, "float32", False, batch_heads=32)  # B=2, Hq=16
    assert spec_of(key).inputs.sizes(key, 32)[:2] == (2, 16)
    room = (_need(key, 16) + _need(key, 32)) // 2  # one sequence fits, two do not
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), memory_bytes=room)
    store, tuner = _tuner(tmp_path, bench)
    [result] = tuner.run([key])
    assert result.shrunk_from == 32 and result.batch_heads == 16
    assert bench._inputs.q.shape[:2] == (1, 16)
    assert result.winner is not None and result.winner_stored
    trials = store.trials(key)
    assert {t.outcome for t in trials} == {"ok"}
    for t in trials:  # the rate of the work the bench really did
        assert t.tflops == pytest.approx(spec_of(key).flops(key, 16) / (t.median_ms * 1e-3) / 1e12, rel=1e-9)
    # The run says so: tune's summary and its key lines.
    from flashtune.tuner.cli.tune import _shrunk_note, _summary

    [row] = _summary([result])["keys"]
    assert row["bench_batch_heads"] == 16 and row["shrunk_from"] == 32 and row["batch_heads"] == 32
    assert _shrunk_note(result.batch_heads, result.shrunk_from) == "; ran at B·Hq 16 of 32 (GPU memory)"
    store.close()


def test_fit_workload_picks_the_largest_batch_that_fits():
    key = Key("sm_90", "bwd", 1024, 64, "bfloat16", True, batch_heads=128)  # B=8, Hq=16
    inputs = spec_of(key).inputs
    assert fit_workload(key, 128, None).batch_heads == 128
    for batch in (8, 5, 1):
        fit = fit_workload(key, 128, _need(key, batch * 16))
        assert fit.batch_heads == batch * 16
        assert fit.reference_bytes >= REFERENCE_MIN_BYTES
    assert fit_workload(key, 128, _need(key, 3 * 16) - 1).batch_heads == 2 * 16
    # The backward holds more per sequence than the forward.
    fwd = Key("sm_90", "fwd", 1024, 64, "bfloat16", True, batch_heads=128)
    assert inputs.footprint(key, 128) > spec_of(fwd).inputs.footprint(fwd, 128)
    with pytest.raises(DoesNotFit, match="out of memory: .* GiB even at batch 1"):
        fit_workload(key, 128, _need(key, 16) - 1)


def test_memory_env_must_be_bytes(monkeypatch, kernel_device):
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MEMORY_ENV}='lots'"):
        LocalBench(kernel_device)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq, nk", [(37, 37), (20, 45), (45, 20)])
def test_references_in_query_row_blocks_match_float64(causal, nq, nk):
    """A budget below one head's scores computes the references a few query rows at a time."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**20, (1,))))
    q, do = (torch.randn(2, 4, nq, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, nk, 16, generator=gen) for _ in range(2))
    wide = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    budget = 3 * nk * 4 * 5  # five rows of one head's scores
    got = fp32_reference(q, *wide, causal, max_bytes=budget)
    assert torch.allclose(got.double(), attention_reference(q, *wide, causal=causal), atol=1e-5)
    # The gradients against float64 autograd of the float64 reference.
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    scale = 0.3
    scores = q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v64.repeat_interleave(2, dim=1)
    want = torch.autograd.grad(out, (q64, k64, v64), do.double())
    got = fp32_gradients(q, k, v, do, causal, scale, max_bytes=6 * 2 * nk * 4 * 7)  # seven rows at a time
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, atol=1e-5), (g.double() - w).abs().max()
