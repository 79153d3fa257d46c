"""Backward benchmark: flashtune's fused FA2 backward vs torch SDPA flash and cuDNN, fwd+bwd and bwd alone.

Shapes: 16k tokens (B = 16384 / N), H·D = 2048, N in --seq, D in --head-dim, causal both ways; fp16 for
every D and bf16 for D=128 (--dtypes). For each shape:

- the forward is flashtune's kernel with the LSE kept (attention_fwd(..., return_lse=True)), the fastest
  of a few forward configs (validated against SDPA's output);
- every backward config of a small grid (plus the default) is first validated against an fp32 torch
  autograd reference on a slice of the shape (one batch, two heads, the full N); a wrong config is
  reported as such and never chosen; the survivors are timed for the backward alone and for
  forward + backward;
- torch SDPA's flash and cuDNN backends are timed the same two ways, in the same process, and their
  gradients on the slice are scored against the same reference for comparison.

Timing is triton.testing.do_bench's median. TFLOP/s use the forward's 4·B·H·N²·D (half if causal);
the backward counts 2.5x that, forward + backward 3.5x. Peak memory is torch's max_memory_allocated
over one forward + backward, less what the inputs already held. Compiles run first in a process pool
(they fill Triton's cache), and any config or backend that fails is recorded and skipped.
Writes <out>/<name>.csv (every measurement) and <out>/<name>.json (default name bwd_bench), and prints
a table last.

    python3 bench/bwd_bench.py --out bench/results/h200            # the H200 run, every shape
    python3 bench/bwd_bench.py --head-dim 64 --name bwd_bench_d64     # or one head dim per run (each
    python3 bench/bwd_bench.py --head-dim 128 --name bwd_bench_d128   # stays well inside 10 minutes)
    TRITON_INTERPRET=1 python3 bench/bwd_bench.py --smoke --out /tmp/bwd_smoke   # CPU check (~1.5 min)
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common import Budget, Shapes, Timer, arguments, error_line, int_list, out_dir, peak_extra_bytes, print_table, \
    provenance, require_gpu, str_list, use_interpreter, write_csv, write_json

use_interpreter("--smoke" in sys.argv)  # the smoke run needs the interpreter unless a GPU is present

import torch  # noqa: E402

from flashtune.db.types import Config  # noqa: E402
from flashtune.kernel.testing import attention_flops, tflops  # noqa: E402
from flashtune.kernel.device import triton_interprets  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative-norm bounds for the slice check against the fp32 autograd reference: the CPU tests' bounds
# (tests/kernel/test_bwd.py) with room for N in the thousands (longer fp32 accumulations, more rounded P).
GRAD_BOUNDS = {"fp16": 1e-2, "bf16": 5e-2, "fp32": 1e-4}
FWD_BOUND = {"fp16": 5e-3, "bf16": 3e-2, "fp32": 1e-4}


def bwd_grid(head_dim: int) -> list[Config]:
    """Hand grid of backward configs around what FA2-style Triton backwards use on Ampere/Hopper."""
    def c(m: int, n: int, w: int, s: int, mdq: int, ndq: int, wdq: int | None = None, sdq: int | None = None,
          det: bool = True) -> Config:
        extra: dict[str, Any] = {"block_m_dq": mdq, "block_n_dq": ndq}
        if wdq is not None:
            extra["num_warps_dq"] = wdq
        if sdq is not None:
            extra["num_stages_dq"] = sdq
        if not det:
            extra = {"deterministic": False}
        return Config(m, n, w, s, extra)

    # Picked from offline compiles (Triton 3.9, sm_90): registers and spills per kernel; most of these
    # spill nothing, a few spill under ~100 bytes; 16-warp dK/dV programs halve the accumulator
    # registers per thread.
    if head_dim <= 64:
        return [c(32, 128, 8, 3, 128, 32), c(32, 128, 8, 2, 128, 32), c(32, 128, 8, 3, 128, 64, 8, 2),
                c(64, 128, 8, 2, 128, 64), c(32, 64, 4, 3, 64, 64, 4, 3), c(64, 64, 8, 2, 128, 32, 8, 3),
                c(16, 128, 8, 3, 128, 16), c(64, 128, 16, 2, 128, 32, 8, 3), c(32, 128, 16, 3, 128, 32, 8, 3),
                c(32, 128, 8, 2, 0, 0, det=False), c(64, 128, 8, 2, 0, 0, det=False), c(32, 64, 4, 3, 0, 0, det=False)]
    if head_dim <= 128:
        return [c(32, 128, 8, 2, 128, 32), c(16, 128, 8, 2, 128, 32), c(32, 64, 8, 3, 128, 32, 8, 2),
                c(32, 128, 8, 3, 128, 64, 8, 2), c(64, 128, 8, 2, 128, 32), c(16, 64, 8, 2, 64, 32),
                c(32, 128, 16, 2, 128, 32, 8, 2), c(64, 128, 16, 2, 128, 64, 8, 2), c(32, 128, 8, 2, 128, 16, 8, 3),
                c(32, 128, 8, 2, 0, 0, det=False), c(16, 128, 8, 2, 0, 0, det=False), c(32, 64, 8, 2, 0, 0, det=False)]
    return [c(16, 64, 8, 2, 64, 16), c(32, 64, 8, 2, 64, 32), c(16, 32, 4, 2, 32, 16), c(16, 64, 8, 1, 64, 32),
            c(16, 64, 8, 2, 0, 0, det=False)]


def fwd_candidates(arch: str, head_dim: int, dtype: str) -> list[Config]:
    """A few forward configs (the fastest one carries the fwd+bwd numbers): the default and H200 winners."""
    from flashtune.kernel.ops.fwd import default_config

    return list(dict.fromkeys([default_config(arch, head_dim, dtype), Config(128, 64, 8, 3), Config(64, 64, 4, 3)]))


def _smoke_grid(head_dim: int) -> list[Config]:
    return [Config(16, 32, 2, 1, {"block_m_dq": 32, "block_n_dq": 16}), Config(16, 16, 2, 1, {"deterministic": False}),
            Config(32, 16, 2, 1)]


def _compile_one(job: tuple[str, int, str, bool]) -> tuple[str, str | None, dict[str, Any]]:
    """Compile (and run once on a small input) one backward config; (config text, error, kernel facts)."""
    from flashtune.kernel.checks import check_bwd_inputs
    from flashtune.kernel.ops.bwd import launch_bwd
    from flashtune.kernel.ops.fwd import attention_fwd

    text, d, dtype, causal = job
    config = Config.parse(text)
    q, k, v, do = (torch.randn(1, 2, 512, d, device="cuda", dtype=DTYPES[dtype]) for _ in range(4))
    try:
        o, lse = attention_fwd(q, k, v, causal=causal, return_lse=True)
        _, _, _, compiled = launch_bwd(do, q, k, v, o, lse, check_bwd_inputs(do, q, k, v, o, lse), causal=causal,
                                       scale=d ** -0.5, config=config, deterministic=False)
        torch.cuda.synchronize()
        facts = {name: dict(shared=int(c.metadata.shared), regs=getattr(c, "n_regs", None),
                            spills=getattr(c, "n_spills", None)) for name, c in compiled.items() if c is not None}
        return text, None, facts
    except Exception as exc:  # noqa: BLE001 - a compile failure is a data point here
        return text, error_line(exc), {}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    diff = a.float() - ref
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.norm() / ref.norm().clamp_min(1e-30))


def _reference_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool):
    """fp32 autograd through torch SDPA's math backend, one (batch, head) at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    with sdpa_kernel(SDPBackend.MATH):
        for h in range(q.shape[1]):
            qf, kf, vf = (x[:, h:h + 1].detach().float().requires_grad_() for x in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
            out.append(torch.autograd.grad(o, (qf, kf, vf), do[:, h:h + 1].float()))
    return tuple(torch.cat([g[i] for g in out], dim=1) for i in range(3))


def _sdpa_grads(backend: Any, q, k, v, do, causal):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        return torch.autograd.grad(o, (qs, ks, vs), do)


def bench_shape(n: int, d: int, dt: str, causal: bool, args: argparse.Namespace, env: dict[str, Any],
                failed: dict, facts: dict, rows: list[dict], summary: list[dict]) -> None:
    """Time one shape: flashtune forward + every valid backward config, SDPA flash and cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtune.kernel.checks import check_bwd_inputs
    from flashtune.kernel.ops.bwd import launch_bwd
    from flashtune.kernel.ops.bwd import default_bwd_config, estimate_bwd_smem
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import launch

    dev, cuda, arch, limit, timer = env["device"], env["cuda"], env["arch"], env["limit"], env["timer"]
    tokens, width = (args.tokens, args.width)
    b, h = max(1, tokens // n), max(1, width // d)
    dtype = DTYPES[dt]
    gen = torch.Generator(device=dev).manual_seed(args.seed + n * d + causal)
    q, k, v, do = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(4))
    scale = d ** -0.5
    shape = check_inputs(q, k, v)
    fwd_flops = attention_flops(b * h, n, n, d, causal)
    tag = dict(N=n, D=d, dtype=dt, causal=int(causal), B=b, H=h)
    print(f"\n== N={n} D={d} {dt} {'causal' if causal else 'full'} (B={b}, H={h})", flush=True)

    def record(provider: str, config: str, mode: str, ms: float | None, flops: float, **more: Any) -> None:
        rows.append(dict(tag, provider=provider, config=config, mode=mode, ms=ms,
                         tflops=tflops(flops, ms) if ms else None, **more))

    # --- the forward: fastest valid candidate, its LSE kept for the backward
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        o_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    fwd_ms: dict[Config, float] = {}
    for config in args.fwd_configs(arch, d, dt):
        try:
            fn = lambda c=config: launch(q, k, v, shape, causal=causal, scale=scale, config=c,  # noqa: E731
                                         return_lse=True)
            o = fn()[0]
            err = _rel(o, o_sdpa.float())
            if err > FWD_BOUND[dt]:
                print(f"  fwd {config}: wrong result (rel err {err:.2e} vs SDPA)")
                record("flashtune", str(config), "fwd", None, fwd_flops, outcome="wrong_result", rel_err=err)
                continue
            fwd_ms[config] = timer(fn)
            record("flashtune", str(config), "fwd", fwd_ms[config], fwd_flops, outcome="ok", rel_err=err)
        except Exception as exc:  # noqa: BLE001
            print(f"  fwd {config}: {error_line(exc)}")
            record("flashtune", str(config), "fwd", None, fwd_flops, outcome="error", error=error_line(exc))
    del o_sdpa
    if not fwd_ms:
        print("  no forward config ran: shape skipped")
        return
    fwd_config = min(fwd_ms, key=fwd_ms.get)
    o, lse, _ = launch(q, k, v, shape, causal=causal, scale=scale, config=fwd_config, return_lse=True)
    print(f"  forward {fwd_config}: {fwd_ms[fwd_config]:.3f} ms, {tflops(fwd_flops, fwd_ms[fwd_config]):.1f} TFLOP/s")

    # --- the validation slice and its fp32 autograd reference
    hs = min(h, 2)
    sl = lambda t: t[:1, :hs]  # noqa: E731
    ref = _reference_grads(sl(q), sl(k), sl(v), sl(do), causal)
    slice_shape = check_bwd_inputs(sl(do), sl(q), sl(k), sl(v), sl(o), sl(lse))

    def slice_error(config: Config) -> float:
        grads = launch_bwd(sl(do), sl(q), sl(k), sl(v), sl(o), sl(lse), slice_shape, causal=causal, scale=scale,
                           config=config, deterministic=False)[:3]
        return max(_rel(g, r) for g, r in zip(grads, ref))

    # --- every backward config: validate, then time bwd alone and fwd + bwd
    default = default_bwd_config(arch, d, dt, limit)
    grid = list(dict.fromkeys([default] + args.grid(d)))
    bwd_ms: dict[Config, float] = {}
    total_ms: dict[Config, float] = {}
    errors: dict[Config, float] = {}
    mems: dict[Config, int | None] = {}
    for config in grid:
        text = str(config)
        est = estimate_bwd_smem(config, d, dt, arch if cuda else None)
        kf = facts.get((text, d, dt, causal), {})
        extra = dict(smem_estimate=est, smem_compiled=max((f["shared"] for f in kf.values()), default=None),
                     spills=sum((f["spills"] or 0) for f in kf.values()) if kf else None,
                     is_default=config == default)
        if limit is not None and est > limit:
            record("flashtune", text, "bwd", None, 2.5 * fwd_flops, outcome="skipped_smem", **extra)
            continue
        if (text, d, dt, causal) in failed:
            record("flashtune", text, "bwd", None, 2.5 * fwd_flops, outcome="compile_error",
                   error=failed[(text, d, dt, causal)], **extra)
            continue
        try:
            err = slice_error(config)
            errors[config] = err
            if not err <= GRAD_BOUNDS[dt]:
                print(f"  bwd {text}: WRONG RESULT (max rel grad error {err:.2e} > {GRAD_BOUNDS[dt]:.0e})")
                record("flashtune", text, "bwd", None, 2.5 * fwd_flops, outcome="wrong_result", rel_err=err, **extra)
                continue
            bwd = lambda c=config: launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=scale,  # noqa: E731
                                              config=c, deterministic=False)[:3]

            def both(c: Config = config) -> Any:
                o2, lse2, _ = launch(q, k, v, shape, causal=causal, scale=scale, config=fwd_config, return_lse=True)
                return launch_bwd(do, q, k, v, o2, lse2, shape, causal=causal, scale=scale, config=c,
                                  deterministic=False)[:3]

            bwd_ms[config] = timer(bwd)
            total_ms[config] = timer(both)
            mems[config] = peak_extra_bytes(both, cuda)
            record("flashtune", text, "bwd", bwd_ms[config], 2.5 * fwd_flops, outcome="ok", rel_err=err, **extra)
            record("flashtune", text, "fwd+bwd", total_ms[config], 3.5 * fwd_flops, outcome="ok", rel_err=err,
                   peak_mem=mems[config], **extra)
            print(f"  bwd {text:58s} {bwd_ms[config]:8.3f} ms {tflops(2.5 * fwd_flops, bwd_ms[config]):6.1f} TFLOP/s"
                  f" | fwd+bwd {tflops(3.5 * fwd_flops, total_ms[config]):6.1f} | err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing config must not stop the run
            print(f"  bwd {text}: {error_line(exc)}")
            record("flashtune", text, "bwd", None, 2.5 * fwd_flops, outcome="error", error=error_line(exc), **extra)
        if cuda:
            torch.cuda.empty_cache()

    # --- SDPA baselines, same process, same inputs
    base: dict[str, dict[str, Any]] = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))

                def fwd_bwd() -> Any:
                    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                    return torch.autograd.grad(out, (qs, ks, vs), do)

                fwd_bwd()
                out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                bwd_only = lambda: torch.autograd.grad(out, (qs, ks, vs), do, retain_graph=True)  # noqa: E731
                fwd_only = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                res = dict(fwd=timer(fwd_only), bwd=timer(bwd_only), total=timer(fwd_bwd))
                out = None  # frees the graph before the memory measurement
                res["peak_mem"] = peak_extra_bytes(fwd_bwd, cuda)
                err = max(_rel(g, r) for g, r in zip(_sdpa_grads(backend, sl(q), sl(k), sl(v), sl(do), causal), ref))
                res["rel_err"] = err
                base[name] = res
                record(name, name, "fwd", res["fwd"], fwd_flops, outcome="ok")
                record(name, name, "bwd", res["bwd"], 2.5 * fwd_flops, outcome="ok", rel_err=err)
                record(name, name, "fwd+bwd", res["total"], 3.5 * fwd_flops, outcome="ok", rel_err=err,
                       peak_mem=res["peak_mem"])
                print(f"  {name:10s} bwd {tflops(2.5 * fwd_flops, res['bwd']):6.1f} TFLOP/s | fwd+bwd "
                      f"{tflops(3.5 * fwd_flops, res['total']):6.1f} | err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a backend unavailable for this shape or GPU
            print(f"  {name} unavailable: {error_line(exc)}")
            record(name, name, "fwd+bwd", None, 3.5 * fwd_flops, outcome="unavailable", error=error_line(exc))

    best = min(total_ms, key=total_ms.get) if total_ms else None
    best_bwd = min(bwd_ms, key=bwd_ms.get) if bwd_ms else None
    s: dict[str, Any] = dict(tag, fwd_config=str(fwd_config), fwd_tflops=tflops(fwd_flops, fwd_ms[fwd_config]),
                             default=str(default), configs_valid=len(bwd_ms),
                             configs_wrong=[str(c) for c, e in errors.items() if not e <= GRAD_BOUNDS[dt]])
    if default in total_ms:
        s.update(default_bwd_tflops=tflops(2.5 * fwd_flops, bwd_ms[default]),
                 default_total_tflops=tflops(3.5 * fwd_flops, total_ms[default]), default_peak_mem=mems[default])
    if best is not None:
        s.update(best=str(best), best_total_tflops=tflops(3.5 * fwd_flops, total_ms[best]),
                 best_bwd_config=str(best_bwd), best_bwd_tflops=tflops(2.5 * fwd_flops, bwd_ms[best_bwd]),
                 best_peak_mem=mems[best], best_rel_err=errors[best])
    for name, res in base.items():
        s.update({f"{name}_bwd_tflops": tflops(2.5 * fwd_flops, res["bwd"]),
                  f"{name}_total_tflops": tflops(3.5 * fwd_flops, res["total"]),
                  f"{name}_peak_mem": res["peak_mem"], f"{name}_rel_err": res["rel_err"]})
    summary.append(s)


def _shapes(args: argparse.Namespace) -> list[tuple[int, int, str, bool]]:
    out = []
    for d, n, causal in itertools.product(args.head_dims, args.seqs, args.causals):
        for dt in args.dtypes:
            if dt == "bf16" and d not in args.bf16_dims:
                continue
            out.append((n, d, dt, causal))
    return out


def main() -> None:
    ap = arguments(__doc__, smoke="tiny shapes and grid; runs on CPU under TRITON_INTERPRET=1", seed=True,
                   timing=[Budget(warmup=10, rep=100)], shapes=Shapes(seq="4096,8192", dtype=None))
    ap.add_argument("--name", default="bwd_bench", help="file stem of the CSV and JSON written under --out")
    ap.add_argument("--dtypes", type=str_list, default="fp16,bf16", help="bf16 runs only for --bf16-head-dims")
    ap.add_argument("--bf16-head-dims", type=int_list, default="128")
    ap.add_argument("--tokens", type=int, default=16384, help="B·N")
    ap.add_argument("--width", type=int, default=2048, help="H·D")
    ap.add_argument("--configs", type=int, default=0, help="use only the first K configs of the grid")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.seq, args.head_dim, args.bf16_head_dims = [40], [32, 64], []
        args.tokens, args.width, args.rep = 96, 128, 20
    require_gpu(unless=triton_interprets(),
                hint="run with --smoke (and TRITON_INTERPRET=1) on CPU")
    args.seqs, args.head_dims, args.bf16_dims, args.causals = args.seq, args.head_dim, args.bf16_head_dims, args.causal
    if not cuda:
        args.dtypes = [dt for dt in args.dtypes if dt != "bf16"]  # the interpreter's bf16 dot is wrong
    grid_fn = _smoke_grid if args.smoke else bwd_grid
    args.grid = lambda d: grid_fn(d)[: args.configs or None]
    args.fwd_configs = (lambda arch, d, dt: [Config(16, 16, 2, 1)]) if args.smoke else fwd_candidates
    out = out_dir(args.out)

    from flashtune.kernel.ops.bwd import default_bwd_config, estimate_bwd_smem

    if cuda:
        from flashtune.kernel.device import device_arch, device_name, device_smem_limit

        arch, limit, gpu = device_arch(0), device_smem_limit(0), device_name(0)
    else:
        arch, limit, gpu = "sm_80", None, "cpu (Triton interpreter)"
    env = dict(device="cuda" if cuda else "cpu", cuda=cuda, arch=arch, limit=limit, timer=Timer.from_args(args, cuda))
    shapes = _shapes(args)

    # 1. compile every (config, D, dtype, causal) in parallel: fills Triton's on-disk cache
    failed: dict = {}
    facts: dict = {}
    compile_wall = 0.0
    if cuda:
        jobs = []
        for d, dt, causal in sorted({(d, dt, c) for _, d, dt, c in shapes}):
            configs = dict.fromkeys([default_bwd_config(arch, d, dt, limit)] + args.grid(d))
            jobs += [(str(c), d, dt, causal) for c in configs if estimate_bwd_smem(c, d, dt, arch) <= limit]
        t0 = time.perf_counter()
        try:
            ctx = torch.multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
                for job, (text, err, kf) in zip(jobs, pool.map(_compile_one, jobs, chunksize=1)):
                    if err:
                        failed[job] = err
                    facts[job] = kf
        except Exception as exc:  # noqa: BLE001 - a broken pool: the timing loop compiles as it goes
            print(f"parallel compile failed ({error_line(exc)}); compiling in the timing loop")
        compile_wall = time.perf_counter() - t0
        print(f"compiled {len(jobs)} backward variants in {compile_wall:.1f} s on {args.workers} workers, "
              f"{len(failed)} failed", flush=True)

    # 2. time every shape; one failing shape must not stop the run
    rows: list[dict] = []
    summary: list[dict] = []
    for n, d, dt, causal in shapes:
        try:
            bench_shape(n, d, dt, causal, args, env, failed, facts, rows, summary)
        except Exception:  # noqa: BLE001
            print(f"shape N={n} D={d} {dt} causal={causal} failed:\n{traceback.format_exc()}", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    # 3. files and the table
    write_csv(out / f"{args.name}.csv", rows)
    meta = dict(provenance(), arch=arch, smem_limit=limit, compile_wall_s=compile_wall, smoke=args.smoke,
                flops="forward 4·B·H·N²·D (half if causal); backward 2.5x forward; fwd+bwd 3.5x",
                compile_failures={str(k): v for k, v in failed.items()},
                compiled={str(k): v for k, v in facts.items()})
    write_json(out / f"{args.name}.json", dict(meta=meta, shapes=summary, rows=rows))

    mib = lambda x: round(x / 2**20) if x else None  # noqa: E731
    ratio = lambda a, b: f"x{a / b:.2f}" if a and b else None  # noqa: E731
    print_table(
        ["dtype", "D", "mask", "N", "fwd+bwd best", "default", "flash", "cuDNN", "vs flash", "vs cuDNN",
         "bwd best", "flash", "cuDNN", "peak MiB ours", "flash", "cuDNN", "best config"],
        [[s["dtype"], s["D"], "causal" if s["causal"] else "full", s["N"], s.get("best_total_tflops"),
          s.get("default_total_tflops"), s.get("sdpa_flash_total_tflops"), s.get("sdpa_cudnn_total_tflops"),
          ratio(s.get("best_total_tflops"), s.get("sdpa_flash_total_tflops")),
          ratio(s.get("best_total_tflops"), s.get("sdpa_cudnn_total_tflops")),
          s.get("best_bwd_tflops"), s.get("sdpa_flash_bwd_tflops"), s.get("sdpa_cudnn_bwd_tflops"),
          mib(s.get("best_peak_mem")), mib(s.get("sdpa_flash_peak_mem")), mib(s.get("sdpa_cudnn_peak_mem")),
          s.get("best")] for s in summary],
        title=f"TFLOP/s on {gpu} ({args.tokens} tokens, H·D={args.width}); bwd = 2.5x fwd FLOPs, fwd+bwd = 3.5x; "
              "peak MiB over one fwd+bwd", floats=".1f")
    print(f"\nwrote {out / (args.name + '.csv')} and {out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
