"""One-shape micro-benchmark: the tuned kernel against torch SDPA's backends, timed in one process.

    python -m flashtune.tuner.benchmarking.run --seq 1024 --head-dim 64 --dtype fp16 --causal

prints, per provider, the median time, TFLOP/s, max abs and relative error against an fp32 reference,
peak memory, and the tuned kernel's speed-up over it. `bench_shape` is the same measurement as a
function: `flashtune bench` calls it once per shape of a sweep. Shapes follow bench/kernel_fwd.py:
16k tokens (B = 16384 // N) and H·D = 2048 unless given. On a machine without CUDA it runs only
under TRITON_INTERPRET=1 (the Triton interpreter, slow: give a tiny shape, e.g.
`--seq 64 --batch 1 --heads 2 --head-dim 16 --dtype fp32`).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ...db.types import check_head_dim, normalize_dtype

from .results import BASELINES, TUNED, BenchRow, BenchShape
from ...kernel.device import INTERPRET
from ...kernel.dtypes import TORCH_DTYPES
from ...kernel.reference import fp32_reference, output_errors
from .providers import PROVIDERS, Provider, select_providers

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
    return BenchShape(batch, heads, seq_len, head_dim, normalize_dtype(dtype), bool(causal))


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


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

    choice = explain(q, k, v, is_causal=causal)
    return f"{choice.config} ({choice.source})"


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
    gpu = _gpu_name(device)
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
            return BenchRow.of(shape, provider.name, "skipped", note=f"out of memory: {_first_line(error)}", gpu=gpu)
        except RuntimeError as error:
            if "no available kernel" in str(error).lower():
                return BenchRow.of(shape, provider.name, "skipped", note=_sdpa_refusal(caught), gpu=gpu)
            return BenchRow.of(shape, provider.name, "error", note=_first_line(error), gpu=gpu)
        except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' rows
            return BenchRow.of(shape, provider.name, "error", note=_first_line(error), gpu=gpu)
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


def _gpu_name(device: torch.device) -> str:
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


# --- the command line ---------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: Sequence[BenchRow]) -> list[str]:
    """A plain-text table of one shape's rows: time, throughput, errors, memory, tuned speed-up."""
    tuned = next((r for r in rows if r.provider == TUNED and r.status == "ok"), None)
    headers = ["provider", "ms", "TFLOP/s", "max abs err", "rel err", "peak MiB", "tuned speed-up", "note"]
    table = [headers]
    for r in rows:
        speedup = tuned.speedups.get(r.provider) if tuned is not None else None
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        table.append([r.provider, _fmt(r.median_ms, ".4f"), _fmt(r.tflops, ".1f"), _fmt(r.max_abs_err, ".2e"),
                      _fmt(r.rel_err, ".2e"), _fmt(mem, ".0f"), "-" if speedup is None else f"{speedup:.2f}x",
                      note])
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashtune.tuner.benchmarking.run",
                                 description="Time flashtune's tuned kernel against torch SDPA's backends "
                                             "on one shape.")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length N (default 1024)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dim D (default 64)")
    ap.add_argument("--dtype", default="fp16", help="fp16, bf16 or fp32 (default fp16)")
    ap.add_argument("--causal", action="store_true", help="causal attention (default: full)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="B·N; B = tokens // N (default 16384)")
    ap.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="H·D; H = hidden // D (default 2048)")
    ap.add_argument("--batch", type=int, default=None, help="batch size B (overrides --tokens)")
    ap.add_argument("--heads", type=int, default=None, help="heads H (overrides --hidden)")
    ap.add_argument("--providers", default=None,
                    help="comma list of flashtune, sdpa_math, sdpa_flash, sdpa_efficient, sdpa_cudnn "
                         "(default: all; flashtune always runs)")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up budget (default 25)")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition budget (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashtune.tuner.benchmarking.run`: print one shape's table; exit 2 on bad input or without a GPU."""
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        shape = bench_shape_for(args.seq, args.head_dim, args.dtype, args.causal, tokens=args.tokens,
                                hidden=args.hidden, batch=args.batch, heads=args.heads)
        providers = select_providers(args.providers)
        if not (args.warmup_ms >= 0 and args.rep_ms > 0):
            raise ValueError(f"--warmup-ms must be >= 0 and --rep-ms > 0, got {args.warmup_ms}, {args.rep_ms}")
        device = bench_device()
    except (ValueError, RuntimeError) as error:
        ap.exit(2, f"{ap.prog}: error: {error}\n")
    from ...kernel.version import KERNEL_VERSION

    timer = default_timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    rows = bench_shape(shape, device, providers=providers, timer=timer, seed=args.seed)
    print(f"{shape} on {_gpu_name(device)}; kernel version {KERNEL_VERSION}; "
          f"{shape.flops / 1e9:.1f} GFLOP per call; errors vs an fp32 SDPA-math reference")
    for line in format_rows(rows):
        print(line)
    return 0 if any(r.provider == TUNED and r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
