"""Measuring one shape: the tuned kernel against torch SDPA's backends, timed in one process.

`bench_shape` gives, per provider, the median time, TFLOP/s, max abs and relative error against an
fp32 reference, peak memory and the speed-ups over the baselines; `flashtune bench` calls it once per
shape of a sweep (one shape is a sweep of one). Shapes follow bench/kernel_fwd.py: 16k tokens
(B = 16384 // N) and H·D = 2048 unless given. On a machine without CUDA it runs only under
TRITON_INTERPRET=1 (the Triton interpreter, slow: tiny shapes only).
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import replace
from typing import Callable, Sequence

import torch

from ...db.errors import first_line
from ...db.types import check_head_dim, normalize_dtype
from ...kernel.device import INTERPRET
from ...kernel.dtypes import FP8_NAME, TORCH_DTYPES
from ...kernel.testing import fp32_reference, output_errors

from .providers import PROVIDERS, Provider
from .results import BASELINES, TUNED, BenchRow, BenchShape

DEFAULT_TOKENS = 16384
DEFAULT_HIDDEN = 2048
MEMORY_MARGIN = 0.9  # a provider whose estimate exceeds this share of the free memory is skipped

Timer = Callable[[str, Callable[[], object]], float]
"""timer(provider name, fn) -> median milliseconds of fn(); injectable so tests need no GPU."""


def _at_least_one(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def bench_shape_for(seq_len: int, head_dim: int, dtype: str, causal: bool, *, tokens: int = DEFAULT_TOKENS,
                    hidden: int = DEFAULT_HIDDEN, batch: int | None = None,
                    heads: int | None = None) -> BenchShape:
    """The benchmark shape for N=`seq_len`: B = tokens // N (at least 1) and H = hidden // D, unless
    `batch` / `heads` fix them. ValueError naming the value for bad sizes."""
    _at_least_one("seq_len", seq_len)
    _at_least_one("tokens", tokens)
    _at_least_one("hidden", hidden)
    check_head_dim(head_dim)
    if _at_least_one("heads", heads) is None:
        if hidden % head_dim:
            raise ValueError(f"hidden size {hidden} is not a multiple of head dim {head_dim}: "
                             "give --heads, or a hidden size that D divides")
        heads = hidden // head_dim
    if _at_least_one("batch", batch) is None:
        batch = max(1, tokens // seq_len)
    dtype = normalize_dtype(dtype)
    if dtype == FP8_NAME:
        raise ValueError("bench compares providers on fp16/bf16/fp32 inputs: fp8 has no SDPA counterpart "
                         "(bench/fp8_bench.py times the fp8 forward; `tune --dtype fp8` tunes it)")
    return BenchShape(batch, heads, seq_len, head_dim, dtype, bool(causal))


def default_timer(device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100) -> Timer:
    """CUDA: triton.testing.do_bench's median (warm-up, L2 flushed before every run).
    CPU (interpreter): the wall-clock median of three runs after one warm-up."""
    if device.type == "cuda":
        import triton.testing

        return lambda name, fn: float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                               return_mode="median"))

    def wall(name: str, fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall


def _sdpa_refusal(caught: Sequence[warnings.WarningMessage]) -> str:
    # torch explains a refused backend in warnings ("... not used because:", then the reasons).
    reasons = [str(w.message).strip() for w in caught]
    reasons = [r.splitlines()[0] for r in reasons if r and not r.rstrip().endswith("because:")]
    return "; ".join(dict.fromkeys(reasons))[:300] or "torch has no kernel of this backend for this shape"


def _first_call(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int | None]:
    """One call; on CUDA also the most memory it allocated beyond what was allocated before."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - before


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()  # memory the caching allocator holds is free for the next provider
    return int(torch.cuda.mem_get_info(device)[0])


def _tuned_note(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    from ...kernel.dispatch import explain

    choice = explain(q, k, v, is_causal=causal, kernel_only=True)
    routed = explain(q, k, v, is_causal=causal)
    # attention() may run an SDPA backend that won this key; the row times the kernel alone.
    return f"{choice.config} ({choice.source})" + (f"; attention() runs {routed.provider}"
                                                   if routed.provider != "kernel" else "")


def make_inputs(shape: BenchShape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v of `shape` drawn from N(0, 1) with a fixed seed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(torch.randn(size, generator=gen, device=device, dtype=TORCH_DTYPES[shape.dtype])
                 for _ in range(3))


def bench_shape(shape: BenchShape, device: torch.device | str, *, providers: Sequence[Provider] = PROVIDERS,
                timer: Timer | None = None, seed: int = 0,
                free_bytes: Callable[[torch.device], int | None] = _free_bytes) -> list[BenchRow]:
    """Run every provider on one shape: a checked first call (errors, peak memory), then the timer.

    A provider that cannot run here, would not fit in free memory, runs out of memory or is refused
    by torch for this shape gets a `skipped` row with the reason; any other exception an `error`
    row. Speed-ups compare each row with every baseline that ran (baseline ms / this ms).
    """
    device = torch.device(device)
    timer = timer or default_timer(device)
    gpu = gpu_name(device)
    q, k, v = make_inputs(shape, device, seed)
    ref = fp32_reference(q, k, v, shape.causal)
    elt = q.element_size()
    rows: list[BenchRow] = []
    for provider in providers:
        reason = provider.unavailable(device)
        need = provider.extra_bytes(shape.batch, shape.heads, shape.seq_len, shape.seq_len, shape.head_dim, elt)
        free = free_bytes(device) if reason is None else None
        if reason is None and free is not None and need > MEMORY_MARGIN * free:
            reason = f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        if reason is not None:
            rows.append(BenchRow.of(shape, provider.name, "skipped", note=reason, gpu=gpu))
            continue
        rows.append(_run_provider(provider, shape, device, q, k, v, ref, timer, gpu))
    del q, k, v, ref
    return with_speedups(rows)


def _run_provider(provider: Provider, shape: BenchShape, device: torch.device, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, timer: Timer, gpu: str) -> BenchRow:
    # torch explains a refused SDPA backend in warnings: record them. The dispatcher's own warnings
    # (a stale or failing stored config) are for the user, so the tuned kernel's pass through.
    recorder = warnings.catch_warnings(record=True) if provider.backend else contextlib.nullcontext([])
    with recorder as caught:
        if provider.backend:
            warnings.simplefilter("always")
        try:
            with provider.context():
                fn = provider.build(q, k, v, shape.causal)
                out, peak = _first_call(fn, device)
                max_abs, rel = output_errors(out, ref)
                del out
                ms = timer(provider.name, fn)
        except torch.cuda.OutOfMemoryError as error:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return BenchRow.of(shape, provider.name, "skipped", note=f"out of memory: {first_line(error)}", gpu=gpu)
        except RuntimeError as error:
            if "no available kernel" in str(error).lower():
                return BenchRow.of(shape, provider.name, "skipped", note=_sdpa_refusal(caught), gpu=gpu)
            return BenchRow.of(shape, provider.name, "error", note=first_line(error), gpu=gpu)
        except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' rows
            return BenchRow.of(shape, provider.name, "error", note=first_line(error), gpu=gpu)
    note = _tuned_note(q, k, v, shape.causal) if provider.name == TUNED else ""
    return BenchRow.of(shape, provider.name, "ok", median_ms=ms, tflops=shape.throughput(ms), max_abs_err=max_abs,
                       rel_err=rel, peak_mem_bytes=peak, note=note, gpu=gpu)


def with_speedups(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """The rows of one shape with speed-ups over every baseline that ran (baseline ms / row ms)."""
    times = {r.provider: r.median_ms for r in rows if r.status == "ok" and r.median_ms}
    out = []
    for row in rows:
        if row.status != "ok" or not row.median_ms:
            out.append(row)
            continue
        speedups = {b: times[b] / row.median_ms for b in BASELINES if b in times and b != row.provider}
        out.append(replace(row, speedups=speedups))
    return out


def gpu_name(device: torch.device) -> str:
    """The GPU's name, or what runs the kernel on the CPU."""
    if device.type == "cuda":
        from ...kernel.device import device_name

        return device_name(device)
    return "cpu (Triton interpreter)"


def bench_device() -> torch.device:
    """The device benchmarks run on: CUDA GPU 0, or the CPU under TRITON_INTERPRET=1.

    RuntimeError when neither is available.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if INTERPRET:
        return torch.device("cpu")
    raise RuntimeError("the benchmark needs a CUDA GPU (none is visible); on a CPU, TRITON_INTERPRET=1 "
                       "runs the kernel in the Triton interpreter for tiny shapes only")
