"""Decode tuning on the GPU: tune the target decode keys, then time attention_kvcache with the tuned
database against the default config and torch SDPA (flash, cuDNN) in TB/s; ragged vs padded; correctness grid.

Steps (under 5 minutes on an H200: two tune calls of at most --budget 50 s each, the timings, pytest capped at 110 s):
1. `tune --decode` (bf16, D=128, Hq=32, Hkv=8 -> group 4, Nq=1) into a fresh SQLite file in OUTDIR:
   B=8 (B·Hq bucket 256) at Nk=32768 and 4096, B=64 (bucket 2048) at Nk=2048; each call bounded by --budget.
   The ragged batch (B=8, lengths 1..32k in a 32k cache) resolves to the B=8 Nk=32768 key.
2. In this process, the dispatcher reloaded from that file: per case, `attention_kvcache(config=None)`
   end to end (the dispatcher's pick; `chk`: a ragged call with check_lengths=True, which reads its lengths
   on the host), the same
   config launched directly (kernel alone), the default decode config, and SDPA flash / cuDNN with
   enable_gqa (uniform cases only: SDPA has no per-sequence lengths). TB/s = (K+V of the live
   tokens + Q + O bytes) / median time (triton.testing.do_bench, L2 flushed). Ragged vs the padded
   (uniform) batch of the same total length.
3. The CPU test files on CUDA (fp16 and bf16, the `gpu`-marked grids included): tests/kernel/test_decode.py,
   tests/kernel/test_head_dims.py (head dims 8, 24, 48, 72, 200 through attention() fwd+bwd, the TMA kernel,
   attention_kvcache) and tests/tuner/test_decode_tuning.py.

Writes OUTDIR/decode_tune_bench.json, OUTDIR/tune_*.json/.log and OUTDIR/pytest_log.txt; the table last.

    python3 bench/decode_tune_bench.py OUTDIR
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import (Budget, Timer, arguments, error_line, out_dir, print_table, provenance,  # noqa: E402
                    write_json, write_text)
from decode_bench import TARGETS, Case, _uniform_like  # noqa: E402

HQ, HKV, D = 32, 8, 128
TUNES = (  # (label, --kv-len, --batch-heads): B·Hq buckets 256 (B=8) and 2048 (B=64)
    ("b8", "4096,32768", "256"),
    ("b64", "2048", "2048"),
)


def cases() -> list[Case]:
    lin = [max(1, round(1 + i * (32768 - 1) / 7)) for i in range(8)]  # 1 .. 32768, evenly spread
    ragged = Case("ragged_b8", 8, 1, 32768, lin, compare_to="uniform_b8")
    return [Case("b8_n32k", 8, 1, 32768), Case("b8_n4k", 8, 1, 4096), Case("b64_n2k", 64, 1, 2048),
            ragged, _uniform_like("uniform_b8", ragged)]


def run_tune(out: Path, url: str, budget_s: int) -> list[dict[str, Any]]:
    """Each TUNES entry through the real `tune` command; the summary rows it printed as JSON."""
    rows = []
    for label, kv, bh in TUNES:
        cmd = [sys.executable, "-m", "flashtune.tuner.cli", "tune", "--decode", "--q-len", "1", "--kv-len", kv,
               "--batch-heads", bh, "--group", str(HQ // HKV), "--head-dim", str(D), "--dtype", "bf16",
               "--no-causal", "--db", url, "--budget", f"{budget_s}s", "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        write_text(out / f"tune_{label}.log", " ".join(cmd) + "\n\n" + done.stderr)
        write_text(out / f"tune_{label}.json", done.stdout)
        print(f"tune {label}: exit {done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            rows += json.loads(done.stdout)["keys"]
        except (ValueError, KeyError):
            print(done.stderr[-2000:], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__, out="positional", out_help="output directory", seed=True,
                   timing=[Budget(warmup=10, rep=30)])
    ap.add_argument("--budget", type=int, default=50, help="seconds per tune call")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest correctness grid")
    args = ap.parse_args(argv)
    out = out_dir(args.out)
    url = f"sqlite:///{(out / 'decode_tune.db').resolve()}"
    started = time.perf_counter()
    tuned_rows = run_tune(out, url, args.budget)

    import torch

    from flashtune.kernel import attention_kvcache, dispatch
    from flashtune.kernel.ops.kvcache import decode_bytes
    from flashtune.kernel.checks import check_kvcache_inputs
    from flashtune.kernel.ops.kvcache import decode_config_for, launch_decode
    from flashtune.kernel.testing import attention_kvcache_reference

    dispatch.reload(url)
    dev, dtype = "cuda", torch.bfloat16
    time_ms = Timer.from_args(args)

    results: dict[str, dict[str, Any]] = {}
    for case in cases():
        gen = torch.Generator(device=dev).manual_seed(args.seed + len(results) + 1)
        q = torch.randn(case.batch, HQ, case.seq_q, D, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(case.batch, HKV, case.n_max, D, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(case.batch, HKV, case.n_max, D, device=dev, dtype=dtype, generator=gen)
        lens = None if case.lengths is None else torch.tensor(case.lengths, dtype=torch.int32, device=dev)
        ragged = lens is not None and any(n != case.n_max for n in case.lengths)
        shape = check_kvcache_inputs(q, k, v)
        nbytes = decode_bytes(batch=case.batch, heads_q=HQ, heads_kv=HKV, seq_q=case.seq_q, kv_tokens=case.kv_tokens,
                              head_dim=D, elt=2)
        tbps = lambda ms: nbytes / (ms * 1e-3) / 1e12  # noqa: E731
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, dtype=torch.float32)
        plan = dispatch.kvcache_plan(q, k, v, False, lens is not None)
        default = decode_config_for(shape, q.device)
        row: dict[str, Any] = dict(batch=case.batch, n_max=case.n_max, kv_tokens=case.kv_tokens, bytes=nbytes,
                                   ragged=ragged, choice=str(plan.choice.config), source=plan.choice.source,
                                   default=str(default), target_tbps=TARGETS.get(case.name))
        out_api = attention_kvcache(q, k, v, cache_seqlens=lens)
        err = float((out_api.float() - ref).norm() / ref.norm())
        row["rel_err"] = err
        row["correct"] = err < 2e-2
        runs = {
            # The default path (lengths clamped on the device, not read back), and the opt-in one that
            # checks the lengths' values on the host (a copy and a sync per call).
            "api": lambda: attention_kvcache(q, k, v, cache_seqlens=lens),
            "api_checked": lambda: attention_kvcache(q, k, v, cache_seqlens=lens, check_lengths=True),
            "tuned": lambda: launch_decode(q, k, v, shape, cache_seqlens=lens, causal=False, scale=D ** -0.5,
                                           config=plan.choice.config)[0],
            "default": lambda: launch_decode(q, k, v, shape, cache_seqlens=lens, causal=False, scale=D ** -0.5,
                                             config=default)[0],
        }
        if not ragged:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def sdpa(backend: Any = backend) -> torch.Tensor:
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                runs[name] = sdpa
        for name, fn in runs.items():
            try:
                ms = time_ms(fn)
                row[f"{name}_ms"], row[f"{name}_tbps"] = ms, tbps(ms)
            except Exception as exc:  # noqa: BLE001 - a backend that refuses is reported, not fatal
                row[f"{name}_error"] = error_line(exc, 200)
        results[case.name] = row
        print(f"[{case.name}] {row.get('tuned_tbps', 0):.2f} TB/s tuned ({row['source']} {row['choice']}), "
              f"{row.get('default_tbps', 0):.2f} default, rel err {err:.2e}", flush=True)
        q = k = v = ref = None
        torch.cuda.empty_cache()
    for name, row in results.items():
        other = results.get("uniform_b8") if name == "ragged_b8" else None
        if other:
            for what in ("tuned", "default", "api", "api_checked"):
                if row.get(f"{what}_ms") and other.get(f"{what}_ms"):
                    row[f"ragged_over_uniform_{what}"] = row[f"{what}_ms"] / other[f"{what}_ms"]

    tests: dict[str, Any] = {"skipped": True}
    if not args.no_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernel/test_decode.py",
               "tests/kernel/test_head_dims.py", "tests/tuner/test_decode_tuning.py"]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=110)
            log, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            log, rc = f"{exc.stdout or ''}\nTIMEOUT after 110 s", 124
        write_text(out / "pytest_log.txt", log if isinstance(log, str) else log.decode())
        last = [line for line in str(log).splitlines() if line.strip()][-1:] or [""]
        tests = {"exit": rc, "summary": last[0], "seconds": round(time.perf_counter() - t0, 1)}

    meta = dict(provenance(), dtype="bfloat16", heads_q=HQ, heads_kv=HKV, head_dim=D, db=url,
                wall_s=round(time.perf_counter() - started, 1))
    write_json(out / "decode_tune_bench.json", dict(meta=meta, tuned=tuned_rows, cases=results, tests=tests))

    print("\ntune:")
    for r in tuned_rows:
        print(f"  {r['key']}: winner {r['winner']} ({r.get('tbps') or 0:.2f} TB/s), default {r['default']}, "
              f"speed-up {r['speedup'] or 0:.2f}, {r['new_trials']} trials{'' if r['complete'] else ' (partial)'}")
    table = []
    for name, r in results.items():
        tail = f"{r['source']} {r['choice']}"
        if "ragged_over_uniform_tuned" in r:
            tail += f"  ragged/uniform: tuned {r['ragged_over_uniform_tuned']:.2f}, " \
                    f"default {r.get('ragged_over_uniform_default', float('nan')):.2f}, " \
                    f"api {r.get('ragged_over_uniform_api', float('nan')):.2f}"
        if not r["correct"]:
            tail += f"  WRONG (rel err {r['rel_err']:.2e})"
        table.append([name, r["batch"], r["n_max"], r.get("tuned_tbps"), r.get("api_tbps"), r.get("api_checked_tbps"),
                      r.get("default_tbps"), r.get("sdpa_flash_tbps"), r.get("sdpa_cudnn_tbps"), r.get("target_tbps"),
                      tail])
    print_table(["case", "B", "Nmax", "tuned", "api", "chk", "dflt", "flash", "cuDNN", "target",
                 "source config / ragged÷uniform time"], table,
                title=f"Decode with the tuned database, bf16 D={D} Hq={HQ} Hkv={HKV} Nq=1, TB/s (K+V+Q+O bytes / "
                      "median time)\napi: attention_kvcache(config=None); chk: the same with check_lengths=True, "
                      "checking the lengths' values")
    print(f"\ncorrectness grid (pytest on CUDA): {tests}")
    print(f"wrote {out / 'decode_tune_bench.json'}")
    bad = not all(r["correct"] for r in results.values()) or tests.get("exit", 0) != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
