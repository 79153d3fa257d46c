"""Host time per call on a CUDA GPU (issue 15): `attention()` vs a raw Triton JIT launch vs torch SDPA.

The same tiny call (B=1, H=1, N=128, D=64, fp16 by default), where the GPU work is a few µs and the
host dominates, made `--calls` times back to back with no synchronisation inside the loop; host µs per
call = perf_counter around the loop, wall µs = to the final synchronize. Repeats are interleaved
(every way once per round) and medians reported. The ways:

- `attention()`: the public API, eager, under torch.no_grad (the dispatcher's plan, then the cached
  compiled kernel relaunched directly: kernel.fastlaunch);
- `attention() JIT path`: the same with the direct relaunch switched off (what it cost before);
- `raw JIT launch`: `kernel.launch.launch` with the same config and a preallocated output, i.e.
  `attn_fwd_kernel[grid](...)` and nothing else;
- `fast relaunch only`: the FastLaunch of the plan called by hand on a preallocated output;
- `torch SDPA`: F.scaled_dot_product_attention with torch's own backend choice, and pinned to flash.

Also checks that attention()'s output equals the raw launch's bitwise. Target: attention() <= SDPA.

    python3 bench/host_bench.py --out bench/results

Writes <out>/host_bench.json; the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _loop(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(host µs/call, wall µs/call) of `calls` back-to-back calls."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for host_bench.json")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (median reported)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtune.kernel import attention, dispatch, fastlaunch
    from flashtune.kernel.launch import launch

    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.head_dim, device="cuda", dtype=dtype,
                           generator=gen) for _ in range(3))
    causal = bool(args.causal)
    torch.set_grad_enabled(False)
    plan = dispatch.plan(q, k, v, causal)
    scale = plan.default_scale
    out = torch.empty_like(q)

    def api() -> Any:
        return attention(q, k, v, is_causal=causal)

    def api_jit() -> Any:
        fastlaunch._state["disabled"] = True
        try:
            return attention(q, k, v, is_causal=causal)
        finally:
            fastlaunch._state["disabled"] = False

    def raw() -> Any:
        return launch(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.kernel, out=out)

    lse_unused = out  # the kernel ignores LSE when STORE_LSE is False

    def fast_only() -> Any:
        launcher = plan.launchers.get(False)
        return launcher.call((q, k, v, out, lse_unused), None)

    def sdpa() -> Any:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa_flash() -> Any:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    # Warm up every way (compiles the kernel, fills the plan's launcher, loads torch's kernels).
    first = api()
    for fn in (api, api_jit, raw, sdpa, sdpa_flash):
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    launcher = plan.launchers.get(False)
    fast_active = bool(launcher) and not fastlaunch.disabled()
    ways: dict[str, Callable[[], Any]] = {"attention()": api, "attention() JIT path": api_jit,
                                          "raw JIT launch": raw}
    if fast_active:
        for _ in range(50):
            fast_only()
        ways["fast relaunch only"] = fast_only
    ways["torch SDPA (auto)"] = sdpa
    ways["torch SDPA (flash)"] = sdpa_flash

    # Correctness: the fast path's output equals the raw JIT launch's, bitwise.
    got = api()
    raw()
    torch.cuda.synchronize()
    equal = bool(torch.equal(got, out)) and bool(torch.equal(first, out))

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            samples[name].append(_loop(fn, args.calls))
    rows = []
    for name, pairs in samples.items():
        rows.append({"way": name, "host_us": statistics.median(p[0] for p in pairs),
                     "wall_us": statistics.median(p[1] for p in pairs),
                     "host_us_min": min(p[0] for p in pairs)})
    by = {r["way"]: r for r in rows}
    sdpa_best = min(by["torch SDPA (auto)"]["host_us"], by["torch SDPA (flash)"]["host_us"])
    sdpa_worst = max(by["torch SDPA (auto)"]["host_us"], by["torch SDPA (flash)"]["host_us"])
    target_met = by["attention()"]["host_us"] <= sdpa_worst
    result = {
        "shape": {"batch": args.batch, "heads": args.heads, "seq": args.seq, "head_dim": args.head_dim,
                  "dtype": args.dtype, "causal": causal},
        "config": str(plan.kernel), "choice": str(plan.choice), "fast_path_active": fast_active,
        "outputs_bitwise_equal": equal, "calls": args.calls, "repeats": args.repeats,
        "rows": rows, "target": "attention() host us <= torch SDPA's in the same run",
        "target_met_vs_slower_sdpa": target_met,
        "target_met_vs_faster_sdpa": by["attention()"]["host_us"] <= sdpa_best,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
    }
    (out_dir / "host_bench.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"GPU {result['gpu']}, torch {torch.__version__}, Triton {triton.__version__}; shape "
          f"B={args.batch} H={args.heads} N={args.seq} D={args.head_dim} {args.dtype} causal={causal}; "
          f"config {plan.kernel}; fast path active: {fast_active}; attention() == raw launch bitwise: {equal}")
    print(f"{args.repeats} interleaved rounds of {args.calls} calls; medians; wrote {out_dir / 'host_bench.json'}")
    print()
    print(f"| {'way':<22} | {'host µs/call':>12} | {'wall µs/call':>12} | {'host min':>8} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 14}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['way']:<22} | {r['host_us']:>12.2f} | {r['wall_us']:>12.2f} | {r['host_us_min']:>8.2f} |")
    print(f"\ntarget attention() <= SDPA host time: {'MET' if target_met else 'NOT MET'} "
          f"(attention() {by['attention()']['host_us']:.2f} µs, SDPA {sdpa_best:.2f}–{sdpa_worst:.2f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
