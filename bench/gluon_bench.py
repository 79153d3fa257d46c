"""The Gluon forward kernel on an sm_90 GPU: correctness of every config in child processes, then speed against
torch SDPA's cuDNN and flash backends, the TMA kernel and the pointer kernel.

1. Correctness. Each Gluon config (tile × ws × overlap, and two consumer partitions on 128-row tiles; schedules alternate over the shapes) runs in its own child process
   with a hard timeout (--check-timeout, default 60 s), so a kernel stuck on an mbarrier ends only that child:
   B=1, H=2 (and a GQA case), N=256 and 300, D=64 and 128, causal and not, fp16 and bf16, on NaN-poisoned
   output, against the float64 reference (max abs error, relative error, LSE error). The children run a few
   at a time.
2. Speed. Configs that passed every check are timed in one child process (its timeout: what is left of
   --budget), each result written as it comes, so a hang loses only what was not yet measured (the tiles of
   TIME_TILES with overlap on: ws off, ws on, two consumers, the last two also persistent; each dtype and head
   dim's binaries are compiled first, in threads):
   triton.testing.do_bench medians, H=16, B·N = 32k tokens, N in 4096, 8192, 16384 (--quick: fp16, D=128,
   N 4096 and 16384), fp16 and bf16, D=128 and 64, causal and not. Every Gluon result is also checked
   against torch SDPA (fp16/bf16, flash backend) on the same inputs before it counts. TFLOP/s = 4·B·H·N²·D,
   half when causal; `vs cudnn` is the Gluon best's time ratio (>1: faster).

Writes <out>/gluon_correctness.csv, <out>/gluon_timing.csv and <out>/gluon_bench.json; prints a table last.

    timeout 330 python3 bench/gluon_bench.py --out bench/results/h100/gluon            # full, ≤ 300 s
    timeout 200 python3 bench/gluon_bench.py --out /tmp/gluon --quick                  # a smaller grid
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import import_flashtune  # bench/ is on the path from the line above

# (block_m, block_n, num_warps, num_stages) of the Gluon configs checked and timed
TILES = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 2)]
QUICK_TILES = [(128, 128, 8, 2), (128, 64, 8, 3)]
# Timed: the Gluon tiles worth the compile time (every ws/overlap combination of them that passed).
TIME_TILES = [(128, 128, 8, 2), (128, 64, 8, 3)]
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, dtype, schedule). Sizes are not specialised on, so
# the cases share nine binaries per config (dtype × head dim × causal × schedule), which keeps each child short.
CHECK_CASES = [
    (1, 2, 2, 256, 256, 64, False, "float16", "grid"), (1, 4, 2, 300, 300, 64, False, "float16", "grid"),
    (1, 2, 2, 256, 256, 64, True, "float16", "heavy_first"), (1, 4, 2, 300, 300, 64, True, "float16", "heavy_first"),
    (1, 2, 2, 256, 256, 128, False, "float16", "grid"), (1, 2, 2, 100, 333, 128, False, "float16", "grid"),
    (1, 2, 2, 256, 256, 128, True, "float16", "grid"), (1, 2, 2, 100, 333, 128, True, "float16", "grid"),
    (1, 2, 2, 333, 100, 128, True, "float16", "grid"),
    (1, 2, 2, 256, 256, 128, True, "bfloat16", "heavy_first"), (1, 4, 1, 300, 300, 128, True, "bfloat16", "heavy_first"),
    (1, 2, 2, 256, 256, 64, False, "bfloat16", "grid"),
    (2, 4, 2, 300, 300, 64, True, "float16", "persistent"), (1, 4, 4, 257, 257, 128, False, "float16", "persistent"),
    (1, 2, 2, 100, 333, 128, True, "bfloat16", "persistent"),
    # more units than an H100 or H200 has SMs: each program strides over several, its K/V ring carrying on
    (2, 16, 8, 640, 640, 128, True, "float16", "persistent"), (2, 16, 8, 640, 640, 64, True, "float16", "persistent"),
]
BOUNDS = {"float16": 2e-3, "bfloat16": 1.5e-2}


# --- child: correctness of one config ----------------------------------------------------------------------


def check_config(text: str) -> None:
    """Print one JSON line per (case, dtype) for the Gluon config `text`."""
    import_flashtune()
    import torch
    from flashtune.db.types import Config
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd_gluon import estimate_gluon_smem, launch_gluon
    from flashtune.kernel.testing import attention_reference, lse_reference

    base = Config.parse(text)
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for i, (b, hq, hkv, nq, nk, d, causal, dtype_name, schedule) in enumerate(CHECK_CASES):
        extra = dict(base.extra_dict, schedule=schedule)
        config = Config(base.block_m, base.block_n, base.num_warps, base.num_stages, tuple(sorted(extra.items())))
        row: dict[str, Any] = {"config": str(config), "case": f"b{b} h{hq}/{hkv} n{nq}x{nk} d{d} causal={causal}",
                               "dtype": dtype_name}
        if estimate_gluon_smem(config, d, dtype_name) > limit:
            print(json.dumps({**row, "outcome": "too_much_smem"}), flush=True)
            continue
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device="cuda").manual_seed(1000 + i)
        q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=gen)
        scale = d ** -0.5
        try:
            o, lse, _ = launch_gluon(q, k, v, check_inputs(q, k, v), causal=causal, scale=scale, config=config,
                                     return_lse=True, out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a compile error is this config's outcome, recorded
            print(json.dumps({**row, "outcome": "error", "error": f"{type(exc).__name__}: "
                              f"{(str(exc).strip().splitlines() or [''])[0]}"[:300]}), flush=True)
            continue
        ref = attention_reference(q, k, v, causal=causal, scale=scale)
        ref_lse = lse_reference(q, k, causal=causal, scale=scale)
        finite = bool(torch.isfinite(o).all())
        diff = (o.double() - ref).abs()
        rel = float((o.double() - ref).norm() / ref.norm()) if finite else math.inf
        lse_err = float((lse.double() - ref_lse).abs().max())
        ok = finite and rel < BOUNDS[dtype_name] and lse_err < 1e-2
        print(json.dumps({**row, "outcome": "ok" if ok else "wrong_result", "max_abs_err": float(diff.max()),
                          "rel_err": rel, "lse_err": lse_err, "finite": finite}), flush=True)


# --- child: timing -------------------------------------------------------------------------------------------


def time_all(configs: list[str], quick: bool, out: Path, warmup: int, rep: int) -> None:
    """Append one JSON line per (shape, candidate) to `out` as each is measured."""
    import_flashtune()
    import torch
    from flashtune.kernel.ops.fwd_tma import tma_config

    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    dtypes = ["float16"] if quick else ["float16", "bfloat16"]
    dims = [128] if quick else [128, 64]
    seqs = [4096, 16384] if quick else [4096, 8192, 16384]
    tma_configs = [tma_config(128, 64, 8, 3), tma_config(128, 64, 4, 2, ws=True)]
    with out.open("a") as sink:
        for dtype_name in dtypes:
            for d in dims:
                _precompile(configs, [dtype_name], [d], limit)
                for n in seqs:
                    for causal in (False, True):
                        for row in _time_shape(dtype_name, d, n, causal, configs, tma_configs, limit, warmup, rep):
                            sink.write(json.dumps(row) + "\n")
                            sink.flush()
                            print(json.dumps(row), flush=True)
                        torch.cuda.empty_cache()


def _timed_config(text: str, causal: bool) -> Any:
    """The Gluon config timed for `text` on a causal or full shape: a persistent one stays persistent, a grid
    one takes the costliest blocks first when causal."""
    from flashtune.db.types import Config

    c = Config.parse(text)
    schedule = c.extra_dict.get("schedule", "grid")
    if schedule != "persistent":
        schedule = "heavy_first" if causal else "grid"
    extra = dict(c.extra_dict, schedule=schedule)
    return Config(c.block_m, c.block_n, c.num_warps, c.num_stages, tuple(sorted(extra.items())))


def _precompile(configs: list[str], dtypes: list[str], dims: list[int], limit: int) -> None:
    """Compile every Gluon binary the timing runs, in threads (sizes are not specialised on: small inputs do)."""
    import torch
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd_gluon import compile_gluon, estimate_gluon_smem

    jobs = [(text, dt, d, causal) for dt in dtypes for d in dims for causal in (False, True) for text in configs]

    def one(job: tuple[str, str, int, bool]) -> None:
        text, dt, d, causal = job
        config = _timed_config(text, causal)
        if estimate_gluon_smem(config, d, dt) > limit:
            return
        q = torch.randn(1, 2, 64, d, device="cuda", dtype=getattr(torch, dt))
        try:
            compile_gluon(q, q, q, check_inputs(q, q, q), causal=causal, scale=d ** -0.5, config=config)
        except Exception as exc:  # noqa: BLE001 - the timing loop records it again for its row
            print(f"precompile {config} {dt} D={d} causal={causal}: {type(exc).__name__}", flush=True)

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, jobs))
    print(f"precompiled {len(jobs)} Gluon binaries in {time.time() - started:.0f} s", flush=True)


def _time_shape(dtype_name: str, d: int, n: int, causal: bool, configs: list[str], tma_configs: list[Any],
                limit: int, warmup: int, rep: int, heads: int = 16):
    """Yield one row per candidate on one shape: H=`heads`, B·N = 32k tokens."""
    import torch
    import triton
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import default_config, launch
    from flashtune.kernel.ops.fwd_gluon import estimate_gluon_smem, launch_gluon
    from flashtune.kernel.ops.fwd_tma import estimate_tma_smem, launch_tma
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, dtype_name)
    b = max(1, 32768 // n)
    gen = torch.Generator(device="cuda").manual_seed(n + d + causal)
    q, k, v = (torch.randn(b, heads, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    shape = check_inputs(q, k, v)
    scale = d ** -0.5
    flops = 4.0 * b * heads * n * n * d * (0.5 if causal else 1.0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa(backend: Any) -> Any:
        def run() -> Any:
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def kernel(fn: Any, config: Any) -> Any:
        return lambda: fn(q, k, v, shape, causal=causal, scale=scale, config=config)

    cands: list[tuple[str, str, Any]] = [("sdpa_cudnn", "", sdpa(SDPBackend.CUDNN_ATTENTION)),
                                         ("sdpa_flash", "", sdpa(SDPBackend.FLASH_ATTENTION))]
    ptr = default_config("sm_90", d, dtype_name, limit)
    cands.append(("pointer", str(ptr), kernel(launch, ptr)))
    cands += [("tma", str(c), kernel(launch_tma, c)) for c in tma_configs
              if estimate_tma_smem(c, d, dtype_name, "sm_90") <= limit]
    for text in configs:
        c = _timed_config(text, causal)
        if estimate_gluon_smem(c, d, dtype_name) <= limit:
            cands.append(("gluon", str(c), kernel(launch_gluon, c)))
    for variant, config, fn in cands:
        row: dict[str, Any] = {"dtype": dtype_name, "head_dim": d, "seq": n, "batch": b, "heads": heads,
                               "causal": causal, "variant": variant, "config": config}
        try:
            result = fn()
            o = result[0] if isinstance(result, tuple) else result
            torch.cuda.synchronize()
            err = float((o.float() - ref.float()).abs().max())
            if not math.isfinite(err) or err > 0.05:
                row.update(outcome="wrong_result", max_abs_err=err)
            else:
                ms = float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
                row.update(outcome="ok", ms=ms, tflops=flops / ms / 1e9, max_abs_err=err)
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is its row
            row.update(outcome="error", error=f"{type(exc).__name__}: "
                       f"{(str(exc).strip().splitlines() or [''])[0]}"[:300])
        yield row


# --- parent ---------------------------------------------------------------------------------------------------


def _child(args: list[str], timeout: float) -> tuple[int | str, str]:
    """(exit status or 'timeout', stdout) of this script run with `args` in a new process group."""
    proc = subprocess.Popen([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        return proc.returncode, stdout
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child and anything it started; only this run's own group
        stdout, _ = proc.communicate()
        return "timeout", stdout or ""


def _json_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def main() -> int:
    from common import out_dir, print_table, require_gpu, write_csv, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV and JSON files")
    parser.add_argument("--quick", action="store_true", help="two Gluon tiles, fp16 D=128 N 4096/16384 timing")
    parser.add_argument("--check-timeout", type=float, default=60.0, help="seconds per correctness child")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run")
    parser.add_argument("--parallel", type=int, default=8, help="correctness children at once")
    parser.add_argument("--warmup", type=int, default=5, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    parser.add_argument("--child-check", help=argparse.SUPPRESS)
    parser.add_argument("--child-time", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_check:
        check_config(args.child_check)
        return 0
    if args.child_time is not None:
        time_all([c for c in args.child_time.split(";") if c], args.quick, args.child_out, args.warmup, args.rep)
        return 0

    require_gpu(hint="the Gluon kernel runs on sm_90 only")
    started = time.time()
    out = out_dir(args.out)
    import_flashtune()
    from flashtune.db.types import Config
    from flashtune.kernel.ops.fwd_gluon import (
        GLUON_AVAILABLE,
        GLUON_IMPORT_ERROR,
        gluon_config,
    )

    if not GLUON_AVAILABLE:
        print(f"gluon_bench: the Gluon kernel is not available here: {GLUON_IMPORT_ERROR}", file=sys.stderr)
        return 2
    tiles = QUICK_TILES if args.quick else TILES
    configs = [str(gluon_config(*t, ws=ws, overlap=ov)) for t in tiles for ws in (False, True) for ov in (False, True)]
    # two consumer partitions: 128-row tiles with ws
    configs += [str(gluon_config(*t, ws=True, overlap=ov, consumers=2)) for t in tiles if t[0] == 128
                for ov in (False, True)]

    # 1. correctness, each config in its own child with a hard timeout
    def check(text: str) -> tuple[str, int | str, list[dict[str, Any]], str]:
        status, stdout = _child(["--out", str(out), "--child-check", text], args.check_timeout)
        return text, status, _json_lines(stdout), stdout

    check_rows: list[dict[str, Any]] = []
    passed: list[str] = []
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for text, status, rows, stdout in pool.map(check, configs):
            check_rows += rows
            good = status == 0 and rows and all(r["outcome"] in ("ok", "too_much_smem") for r in rows)
            if status != 0:
                tail = " | ".join(stdout.strip().splitlines()[-3:])[-400:]
                check_rows.append({"config": text, "outcome": "timeout" if status == "timeout" else "crashed",
                                   "error": tail})
            if good:
                passed.append(text)
            print(f"check {text}: {'ok' if good else 'FAILED'} (exit {status}, {len(rows)} cases)", flush=True)
    write_csv(out / "gluon_correctness.csv", check_rows)

    # 2. timing of the configs that passed, in one child that writes each result as it goes
    timing_file = out / "gluon_timing.jsonl"
    timing_file.unlink(missing_ok=True)
    left = args.budget - (time.time() - started)
    status: int | str = "skipped"
    if left > 20:
        def tile(text: str) -> tuple[int, int, int, int]:
            c = Config.parse(text)
            return c.block_m, c.block_n, c.num_warps, c.num_stages
        # The overlapped configs of the timed tiles (FA3's pipeline; the others are slower by design), and the
        # persistent schedule of the warp-specialised ones (checked in the same children).
        timed = [c for c in passed if tile(c) in TIME_TILES and '"overlap":true' in c]
        timed += [c.replace('"schedule":"grid"', '"schedule":"persistent"') for c in timed if '"ws":true' in c]
        child = ["--out", str(out), "--child-time", ";".join(timed), "--child-out", str(timing_file),
                 "--warmup", str(args.warmup), "--rep", str(args.rep)] + (["--quick"] if args.quick else [])
        status, stdout = _child(child, left - 5)
        if status != 0:
            print("timing child:", status, " | ".join(stdout.strip().splitlines()[-5:])[-800:])
    timing = _json_lines(timing_file.read_text()) if timing_file.exists() else []
    write_csv(out / "gluon_timing.csv", timing)
    write_json(out / "gluon_bench.json", {"correctness": check_rows, "timing": timing, "passed": passed,
                                          "timing_status": status, "wall_s": time.time() - started})

    # the table: per shape, the best of each variant and the Gluon best's ratio to cuDNN
    shapes: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in timing:
        if r.get("outcome") != "ok":
            continue
        key = (r["dtype"], r["head_dim"], r["seq"], r["causal"])
        best = shapes.setdefault(key, {})
        if r["variant"] not in best or r["ms"] < best[r["variant"]]["ms"]:
            best[r["variant"]] = r
    table = []
    for (dtype, d, n, causal), best in sorted(shapes.items()):
        def tf(v: str, best=best) -> float | None:
            return best[v]["tflops"] if v in best else None
        g, cudnn = best.get("gluon"), best.get("sdpa_cudnn")
        table.append([dtype, d, n, int(causal), tf("gluon"), tf("sdpa_cudnn"), tf("sdpa_flash"), tf("tma"),
                      tf("pointer"), (cudnn["ms"] / g["ms"]) if g and cudnn else None,
                      g["config"] if g else None])
    failed = [r for r in check_rows if r.get("outcome") not in ("ok", "too_much_smem")]
    print(f"\ncorrectness: {len(passed)}/{len(configs)} Gluon configs passed; {len(failed)} failing rows "
          f"(see {out / 'gluon_correctness.csv'})")
    for r in failed[:10]:
        print("  ", r.get("config"), r.get("case", ""), r.get("dtype", ""), r.get("outcome"),
              r.get("rel_err", r.get("error", "")))
    print_table(["dtype", "D", "N", "causal", "gluon TF/s", "cudnn", "flash", "tma", "pointer", "vs cudnn",
                 "gluon config"], table, title=f"TFLOP/s (H=16, B·N=32k; timing {status}; "
                                               f"{time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
