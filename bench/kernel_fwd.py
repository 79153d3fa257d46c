"""Forward-kernel benchmark on a CUDA GPU: a hand grid of configs per shape vs torch SDPA.

Shapes: 16k tokens (B·N = 16384), H·D = 2048, N in --seq, D in --head-dim, causal both ways, fp16 and
bf16. For each shape every config of the hand grid is timed (triton.testing.do_bench, median, L2
flushed between repetitions), beside torch SDPA's flash and cuDNN backends timed in the same run.
Compiles run first in the tuner's compile pool (flashtune.tuner.compile_pool: they fill Triton's
on-disk cache, so the timing process only loads them). Writes <out>/kernel_fwd.csv (every timing), <out>/kernel_fwd_summary.json, and prints
a per-shape table: best, median, worst, default config, baselines.

    python3 bench/kernel_fwd.py --out bench/results/h200
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import torch
from common import Budget, Shapes, Timer, arguments, out_dir, print_table, provenance, require_gpu, write_csv, \
    write_json

from flashtune.kernel.ops.fwd import estimate_smem  # noqa: E402
from flashtune.db.types import Config, Key  # noqa: E402
from flashtune.kernel.testing import attention_flops  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def hand_grid() -> list[Config]:
    """48 configs around what FA2-style kernels use on Ampere/Hopper."""
    grid = [Config(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    grid += [Config(128, 128, 8, 1), Config(128, 64, 8, 1), Config(256, 64, 8, 2), Config(256, 64, 8, 3),
             Config(256, 128, 8, 2), Config(256, 64, 16, 2), Config(256, 128, 16, 2), Config(128, 128, 16, 2),
             Config(32, 32, 4, 2), Config(32, 64, 4, 3), Config(64, 64, 2, 2), Config(128, 32, 8, 5)]
    return grid


def main() -> None:
    ap = arguments(__doc__, seed=True, timing=[Budget(warmup=10, rep=40)],
                   shapes=Shapes(seq="512,1024,2048,4096,8192,16384"))
    ap.add_argument("--configs", type=int, default=0, help="use only the first K configs of the grid")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = ap.parse_args()
    require_gpu()
    out = out_dir(args.out)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtune.kernel.ops.fwd import default_config
    from flashtune.kernel.device import device_arch, device_smem_limit
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import launch

    seqs, dims, dtypes, causals = args.seq, args.head_dim, args.dtype, args.causal
    arch, limit = device_arch(0), device_smem_limit(0)
    timer = Timer.from_args(args)
    grid = hand_grid()[: args.configs or None]

    # 1. compile everything in parallel. The compile pool's inputs have 16 heads (B·H = 16), which
    # Triton specialises on like the timed shapes' 16 or 32 heads (divisible by 16); N 256 like any
    # multiple of 16.
    from flashtune.tuner.compile_pool import CompilePool

    jobs, failed = [], {}
    t0 = time.perf_counter()
    pool = CompilePool("cuda:0", args.workers, timeout_s=600)
    try:
        for d, dt, causal in itertools.product(dims, dtypes, causals):
            configs = sorted(set(grid) | {default_config(arch, d, dt, limit)}, key=str)
            configs = [c for c in configs if estimate_smem(c, d, dt, arch) <= limit]
            jobs += [(str(c), d, dt, causal) for c in configs]
            warmed = pool.warm(Key(arch, "fwd", 256, d, DTYPES_NAMES[dt], causal), 16, configs)
            failed.update({(str(c), d, dt, causal): f"{w.outcome}: {w.error}" for c, w in warmed.items()
                           if w.outcome != "ok"})
    finally:
        pool.close()
    compile_wall = time.perf_counter() - t0
    print(f"compiled {len(jobs)} kernels in {compile_wall:.1f} s wall on {args.workers} processes, "
          f"{len(failed)} failed", flush=True)

    # 2. time every shape
    rows, summary = [], []
    for d, dt, causal, n in itertools.product(dims, dtypes, causals, seqs):
        b, h = 16384 // n, 2048 // d
        gen = torch.Generator(device="cuda").manual_seed(args.seed + n * d)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=DTYPES[dt], generator=gen) for _ in range(3))
        flops = attention_flops(b * h, n, n, d, causal)
        tflops = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        shape = check_inputs(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        base = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                    fn()
                    base[name] = timer(fn)
            except RuntimeError as exc:
                print(f"  {name} unavailable for this shape: {exc}".splitlines()[0])
        default = default_config(arch, d, dt, limit)
        times = {}
        for config in sorted(set(grid) | {default}, key=str):
            if estimate_smem(config, d, dt, arch) > limit or (str(config), d, dt, causal) in failed:
                continue
            fn = lambda: launch(q, k, v, shape, causal=causal, scale=d ** -0.5, config=config)  # noqa: E731
            o = fn()[0]
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = timer(fn)
            times[config] = ms
            rows.append(dict(N=n, D=d, dtype=dt, causal=int(causal), config=str(config), ms=ms,
                             tflops=tflops(ms), rel_err_vs_sdpa=err))
        for name, ms in base.items():
            rows.append(dict(N=n, D=d, dtype=dt, causal=int(causal), config=name, ms=ms, tflops=tflops(ms),
                             rel_err_vs_sdpa=0.0))
        best = min(times, key=times.get)
        _, _, kern = launch(q, k, v, shape, causal=causal, scale=d ** -0.5, config=best)
        ptx = kern.asm.get("ptx", "") if kern is not None else ""
        summary.append(dict(
            N=n, D=d, dtype=dt, causal=causal, configs_timed=len(times), best=str(best),
            best_tflops=tflops(times[best]), median_tflops=tflops(statistics.median(times.values())),
            worst_tflops=tflops(max(times.values())), default=str(default),
            default_tflops=tflops(times[default]) if default in times else None,
            **{f"{k}_tflops": tflops(ms) for k, ms in base.items()},
            best_regs=getattr(kern, "n_regs", None), best_spills=getattr(kern, "n_spills", None),
            best_smem=kern.metadata.shared if kern is not None else None,
            best_uses_wgmma="wgmma" in ptx, best_uses_mma_sync="mma.sync" in ptx))
        s = summary[-1]
        print(f"N={n:5d} D={d:3d} {dt} causal={int(causal)} best {s['best']:16s} {s['best_tflops']:6.1f} | "
              f"median {s['median_tflops']:6.1f} worst {s['worst_tflops']:6.1f} default {s['default_tflops'] or 0:6.1f} | "
              f"flash {s.get('sdpa_flash_tflops') or 0:6.1f} cudnn {s.get('sdpa_cudnn_tflops') or 0:6.1f}", flush=True)
        del q, k, v, ref

    write_csv(out / "kernel_fwd.csv", rows)
    meta = dict(provenance(), compile_wall_s=compile_wall, compile_jobs=len(jobs),
                compile_failures={f"{k}": v for k, v in failed.items()})
    write_json(out / "kernel_fwd_summary.json", dict(meta=meta, shapes=summary))

    print_table(
        ["dtype", "D", "mask", "N", "best", "default", "flash", "cuDNN", "vs flash", "vs cuDNN", "best config"],
        [[s["dtype"], s["D"], "causal" if s["causal"] else "full", s["N"], s["best_tflops"], s["default_tflops"],
          s.get("sdpa_flash_tflops"), s.get("sdpa_cudnn_tflops"),
          *(f"x{s['best_tflops'] / b:.2f}" if b else None for b in (s.get("sdpa_flash_tflops"),
                                                                    s.get("sdpa_cudnn_tflops"))),
          s["best"]] for s in summary],
        title="TFLOP/s (fwd, 16k tokens, H*D=2048): best of grid / default / SDPA flash / cuDNN; best vs flash, "
              "vs cuDNN", floats=".1f")


if __name__ == "__main__":
    main()
