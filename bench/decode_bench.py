"""Decode / KV-cache benchmark: the split-KV kernel vs torch SDPA flash and cuDNN, in TB/s.

Cases (bf16, D=128, Hq=32, Hkv=8 unless --smoke): B=8 Nk=32768, B=8 Nk=4096, B=64 Nk=2048 with Nq=1;
a few Nq=4/8 rows (one bottom-right causal); ragged batches (lengths from 1 to 32k in one static
cache) beside the uniform batch of the same total length. For each case: flashtune's default decode
config, the best of a small grid (num_splits x BLOCK_N x warps x stages; every config is checked
against an fp32 reference before it is timed, and a wrong one is reported, never best), the public
`attention_kvcache` end to end (by default the lengths are clamped on the device, never read on the
host), and SDPA's flash and cuDNN backends in the same process (GQA through enable_gqa=True, else repeated heads; a backend that refuses a shape
is reported, not fatal). SDPA has no per-sequence lengths: ragged cases have no SDPA figure.

Effective bandwidth = (K and V bytes of the live tokens + Q + O bytes) / median time, in TB/s. Times are
`triton.testing.do_bench` medians, which flush the L2 between repetitions. Every timing goes to
<out>/decode_bench.csv, a summary with the versions to <out>/decode_bench.json (both rewritten after
each case, so an interrupted run keeps what it measured); a table is printed last. The exit status is
1 when any config gave a wrong result.

With --bucket it checks instead that the winner of a cache-length bucket serves every length in it
(attention_kvcache plans, and `tune --recorded` tunes, one key per `kv_bucket`): for a few decode
shapes (bf16, D=128, Hq=32, Hkv=8, Nq=1: B=1 and B=8 in the 2048 bucket, B=8 in the 16384 bucket), at
lengths spread from the bucket's first to its last (its own length among them), it times every config
of the tuner's kvcache space for that exact length (tuner.ops.kvcache.kvcache_space, each checked
against the fp32 reference first), and reports per length the best of them against: the bucket's
winner (the best config at the bucket's own length, i.e. what tuning the bucket key stores), the
dispatcher's pick for the call (`dispatch.kvcache_plan`, from the database it loads, or --db) and the
default at that length. Launch time only (launch_decode; the host path is bench/host_bench.py's).
Writes <out>/decode_bucket_bench.json; the table is printed last; exit 1 on a wrong result.

    python3 bench/decode_bench.py --out bench/results/h200           # on the GPU machine
    TRITON_INTERPRET=1 python3 bench/decode_bench.py --smoke --out /tmp/decode_smoke   # CPU check
    python3 bench/decode_bench.py --bucket --out bench/results/h100   # the bucket check, on the GPU
    TRITON_INTERPRET=1 python3 bench/decode_bench.py --bucket --smoke --out /tmp/decode_bucket_smoke
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from common import Budget, Timer, arguments, error_line, out_dir, print_table, provenance, require_gpu, \
    use_interpreter, utc_now, write_csv, write_json

# Targets, TB/s effective (the H200's copy bandwidth is about 4.3 TB/s).
TARGETS = {"b8_n32k": 3.6, "b8_n4k": 2.4, "b64_n2k": 3.5}
BOUND = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-4}  # ‖o − ref‖/‖ref‖ against the fp32 reference


@dataclass
class Case:
    name: str
    batch: int
    seq_q: int
    n_max: int
    lengths: list[int] | None = None  # None: every sequence has n_max keys (no cache_seqlens)
    causal: bool = False
    compare_to: str | None = None  # for ragged cases: the uniform case of the same total length
    notes: list[str] = field(default_factory=list)

    @property
    def kv_tokens(self) -> int:
        return sum(self.lengths) if self.lengths is not None else self.batch * self.n_max


def _uniform_like(name: str, ragged: Case) -> Case:
    """The batch of the same size and total length with every sequence equally long."""
    n = max(1, round(ragged.kv_tokens / ragged.batch))
    return Case(name, ragged.batch, ragged.seq_q, n, [n] * ragged.batch, ragged.causal)


def gpu_cases() -> list[Case]:
    import random

    cases = [Case("b8_n32k", 8, 1, 32768), Case("b8_n4k", 8, 1, 4096), Case("b64_n2k", 64, 1, 2048)]
    lin = [max(1, round(1 + i * (32768 - 1) / 7)) for i in range(8)]  # 1 .. 32768, evenly spread
    cases.append(Case("ragged_b8", 8, 1, 32768, lin, compare_to="uniform_b8"))
    cases.append(_uniform_like("uniform_b8", cases[-1]))
    rng = random.Random(12)
    rand = [rng.randint(1, 32768) for _ in range(32)]
    rand[0], rand[1] = 1, 32768
    cases.append(Case("ragged_b32", 32, 1, 32768, rand, compare_to="uniform_b32"))
    cases.append(_uniform_like("uniform_b32", cases[-1]))
    cases += [Case("b8_n4k_q4", 8, 4, 4096), Case("b8_n32k_q4", 8, 4, 32768),
              Case("b8_n4k_q4_causal", 8, 4, 4096, causal=True), Case("b64_n2k_q8", 64, 8, 2048)]
    return cases


def smoke_cases() -> list[Case]:
    ragged = Case("ragged_smoke", 3, 1, 96, [1, 50, 96], compare_to="uniform_smoke")
    return [Case("b2_n64", 2, 1, 64), ragged, _uniform_like("uniform_smoke", ragged),
            Case("b2_n40_q4_causal", 2, 4, 40, [40, 7], causal=True)]


def config_grid(default: Any, seq_kv: int, size: str) -> list[Any]:
    """num_splits around the default's x BLOCK_N x (warps, stages); the default's M tile."""
    from flashtune.db.types import Config
    from flashtune.kernel.ops.kvcache import SPLITS_KNOB

    s = int(default.extra_dict.get(SPLITS_KNOB, 1))
    if size == "smoke":
        return [Config(default.block_m, 16, 2, 1, {SPLITS_KNOB: n}) for n in (1, 3)]
    if size == "small":
        splits = {max(1, s // 2), s, 2 * s}
        tiles, warps_stages = (64, 128), ((4, 2), (4, 3), (8, 3))
    else:
        splits = {1, max(1, s // 4), max(1, s // 2), s, 2 * s, 4 * s}
        tiles, warps_stages = (32, 64, 128), ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (2, 3))
    grid = []
    for n, bn, (w, st) in itertools.product(sorted(splits), tiles, warps_stages):
        if n <= max(1, math.ceil(seq_kv / bn)):
            grid.append(Config(default.block_m, bn, w, st, {SPLITS_KNOB: n}))
    return grid


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__, smoke="tiny shapes, fp16 on CPU, SDPA's math backend instead of flash/cuDNN (runs on "
                   "CPU under TRITON_INTERPRET=1)", seed=True, timing=[Budget(warmup=10, rep=30)])
    ap.add_argument("--grid", choices=("small", "full"), default="small", help="configs tried per case")
    ap.add_argument("--cases", default="", help="comma list of case names to run (default: all)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baselines")
    ap.add_argument("--bucket", action="store_true",
                    help="check that a cache-length bucket's winner serves every length in it (see above)")
    ap.add_argument("--lengths", type=int, default=6, help="--bucket: lengths per bucket (the bucket's own added)")
    ap.add_argument("--db", default=None, help="--bucket: reload the dispatcher from this database URL first")
    args = ap.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available() and not args.smoke
    require_gpu(unless=args.smoke, hint="run with --smoke (tiny shapes under the Triton interpreter)")
    use_interpreter(args.smoke)  # before the kernels are imported
    if args.bucket:
        return bucket_main(args)

    from flashtune.kernel.ops.kvcache import decode_bytes
    from flashtune.kernel.kvcache import attention_kvcache
    from flashtune.kernel.checks import check_kvcache_inputs
    from flashtune.kernel.ops.kvcache import decode_config_for, launch_decode
    from flashtune.kernel.testing import attention_kvcache_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        dtype, heads_q, heads_kv, head_dim = (torch.bfloat16 if device == "cuda" else torch.float16), 4, 2, 32
        # SDPA's math backend stands in for flash/cuDNN so that the baseline code path runs too.
        cases, size, use_sdpa = smoke_cases(), "smoke", not args.no_sdpa
    else:
        dtype, heads_q, heads_kv, head_dim = torch.bfloat16, 32, 8, 128
        cases, size, use_sdpa = gpu_cases(), args.grid, not args.no_sdpa
    dtype_name = str(dtype).removeprefix("torch.")
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.name for c in cases}
        if unknown:
            ap.error(f"unknown case(s) {', '.join(sorted(unknown))}: known {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted]
    out = out_dir(args.out)
    elt = torch.empty((), dtype=dtype).element_size()
    timer = Timer.from_args(args, on_gpu)  # on the CPU it only proves the path runs

    meta: dict[str, Any] = dict(
        provenance(), dtype=dtype_name, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, grid=size,
        rep_ms=args.rep, smoke=args.smoke, cudnn=torch.backends.cudnn.version() if device == "cuda" else None)

    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}

    def save() -> None:
        write_csv(out / "decode_bench.csv", rows)
        write_json(out / "decode_bench.json", dict(meta=meta, cases=summary))

    for case in cases:
        t_case = time.perf_counter()
        print(f"[{case.name}] B={case.batch} Nq={case.seq_q} Nmax={case.n_max} tokens={case.kv_tokens} "
              f"causal={case.causal}", flush=True)
        gen = torch.Generator(device=device).manual_seed(args.seed + zlib.crc32(case.name.encode()))
        try:
            q = torch.randn(case.batch, heads_q, case.seq_q, head_dim, device=device, dtype=dtype, generator=gen)
            k = torch.randn(case.batch, heads_kv, case.n_max, head_dim, device=device, dtype=dtype, generator=gen)
            v = torch.randn(case.batch, heads_kv, case.n_max, head_dim, device=device, dtype=dtype, generator=gen)
            lens = (None if case.lengths is None
                    else torch.tensor(case.lengths, dtype=torch.int32, device=device))
            shape = check_kvcache_inputs(q, k, v)
            ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=case.causal,
                                              dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the other cases still run
            print(f"  setup failed: {error_line(exc, 200)}", flush=True)
            summary[case.name] = dict(error=error_line(exc, 200))
            save()
            continue
        nbytes = decode_bytes(batch=case.batch, heads_q=heads_q, heads_kv=heads_kv, seq_q=case.seq_q,
                              kv_tokens=case.kv_tokens, head_dim=head_dim, elt=elt)
        tbps = lambda ms: nbytes / (ms * 1e-3) / 1e12  # noqa: E731
        scale = head_dim ** -0.5
        base = dict(case=case.name, batch=case.batch, seq_q=case.seq_q, n_max=case.n_max, kv_tokens=case.kv_tokens,
                    causal=int(case.causal), bytes=nbytes)

        def rel_err(o: Any) -> float:
            diff = o.float() - ref
            if not bool(torch.isfinite(diff).all()):
                return math.inf
            return float(diff.norm() / ref.norm().clamp_min(1e-30))

        def measure(label: str, kind: str, fn: Callable[[], Any], extra: dict[str, Any] | None = None,
                    check: bool = True) -> float | None:
            """Run once, check against the reference, time; one row either way. The time, or None."""
            row = dict(base, provider=kind, config=label, ms=None, tbps=None, rel_err=None, status="ok", error="")
            row.update(extra or {})
            try:
                o = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if check:
                    err = rel_err(o)
                    row["rel_err"] = err
                    if not err <= BOUND[dtype_name]:
                        row["status"] = "wrong_result"
                        print(f"  WRONG RESULT {kind} {label}: rel err {err:.3e}", flush=True)
                        rows.append(row)
                        return None
                ms = timer(fn)
                row.update(ms=ms, tbps=tbps(ms))
                rows.append(row)
                return ms
            except Exception as exc:  # noqa: BLE001 - one failing config or backend must not stop the run
                row.update(status="error", error=error_line(exc, 200))
                rows.append(row)
                print(f"  {kind} {label}: {row['error']}", flush=True)
                if os.environ.get("DECODE_BENCH_TRACEBACK"):
                    traceback.print_exc()
                if device == "cuda":
                    torch.cuda.synchronize()
                return None

        default = decode_config_for(shape, q.device)
        timings: dict[str, float] = {}
        grid = config_grid(default, case.n_max, size)
        for config in [default] + [c for c in grid if c != default]:
            fn = lambda c=config: launch_decode(q, k, v, shape, cache_seqlens=lens, causal=case.causal,  # noqa: E731
                                                scale=scale, config=c)[0]
            ms = measure(str(config), "flashtune", fn, dict(is_default=int(config == default)))
            if ms is not None:
                timings[str(config)] = ms
        api_ms = measure("attention_kvcache(default)", "flashtune_api",
                         lambda: attention_kvcache(q, k, v, cache_seqlens=lens, causal=case.causal))

        sdpa: dict[str, dict[str, Any]] = {}
        if use_sdpa and case.lengths is not None and any(n != case.n_max for n in case.lengths):
            case.notes.append("SDPA has no per-sequence lengths: no baseline for a ragged batch")
        elif use_sdpa and case.causal and case.seq_q > 1:
            case.notes.append("SDPA's is_causal is top-left: no bottom-right baseline without a mask")
        elif use_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            group = heads_q // heads_kv
            backends = ((("sdpa_math", SDPBackend.MATH),) if args.smoke else
                        (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)))
            for name, backend in backends:
                for how in ("enable_gqa", "repeat_kv"):
                    if how == "enable_gqa":
                        kk, vv, kw = k, v, {"enable_gqa": True}
                    else:  # the backend refused GQA: give it one KV head per query head (not timed: built here)
                        kk, vv, kw = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), {}

                    def run(kk=kk, vv=vv, kw=kw, backend=backend):
                        with sdpa_kernel(backend):
                            # Nq=1: no causal mask (bottom-right causal sees every key; is_causal would not).
                            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, scale=scale, **kw)
                    ms = measure(how, name, run)
                    if ms is not None:
                        sdpa[name] = dict(ms=ms, tbps=tbps(ms), how=how)
                        break
                    del kk, vv
                if name not in sdpa:
                    case.notes.append(f"{name}: refused or failed (see the CSV)")

        ok = {c: ms for c, ms in timings.items()}
        best = min(ok, key=ok.get) if ok else None
        wrong = [r["config"] for r in rows if r["case"] == case.name and r["status"] == "wrong_result"]
        failed = [r["config"] for r in rows if r["case"] == case.name and r["status"] == "error"
                  and r["provider"] == "flashtune"]
        best_kernel: dict[str, Any] = {}
        if best is not None and device == "cuda":
            try:
                from flashtune.db.types import Config

                _, compiled = launch_decode(q, k, v, shape, cache_seqlens=lens, causal=case.causal, scale=scale,
                                            config=Config.parse(best))
                first = compiled[0]
                best_kernel = dict(regs=getattr(first, "n_regs", None), spills=getattr(first, "n_spills", None),
                                   smem=getattr(getattr(first, "metadata", None), "shared", None))
            except Exception as exc:  # noqa: BLE001 - provenance only
                best_kernel = dict(error=error_line(exc, 200))
        s = dict(batch=case.batch, seq_q=case.seq_q, n_max=case.n_max, kv_tokens=case.kv_tokens,
                 causal=case.causal, bytes=nbytes, default=str(default),
                 default_ms=timings.get(str(default)),
                 default_tbps=tbps(timings[str(default)]) if str(default) in timings else None,
                 best=best, best_ms=ok.get(best) if best else None, best_tbps=tbps(ok[best]) if best else None,
                 api_ms=api_ms, api_tbps=tbps(api_ms) if api_ms else None,
                 configs_timed=len(ok), wrong_results=wrong, failed=failed, best_kernel=best_kernel,
                 target_tbps=TARGETS.get(case.name), compare_to=case.compare_to, notes=case.notes,
                 wall_s=time.perf_counter() - t_case,
                 **{f"{n}_{k_}": v_ for n, d in sdpa.items() for k_, v_ in d.items()})
        summary[case.name] = s
        print(f"  default {s['default']} {s['default_tbps'] or 0:.2f} TB/s | best {best} {s['best_tbps'] or 0:.2f} TB/s"
              f" | api {s['api_tbps'] or 0:.2f} | flash {s.get('sdpa_flash_tbps') or 0:.2f} | "
              f"cudnn {s.get('sdpa_cudnn_tbps') or 0:.2f} | {len(wrong)} wrong, {len(failed)} failed | "
              f"{s['wall_s']:.0f} s", flush=True)
        q = k = v = ref = None  # free the case's tensors before the next one is built
        if device == "cuda":
            torch.cuda.empty_cache()
        save()

    for name, s in summary.items():  # ragged vs the uniform batch of the same total length
        other = summary.get(s.get("compare_to") or "")
        if other and s.get("best_ms") and other.get("best_ms"):
            s["ragged_over_uniform_best"] = s["best_ms"] / other["best_ms"]
        if other and s.get("default_ms") and other.get("default_ms"):
            s["ragged_over_uniform_default"] = s["default_ms"] / other["default_ms"]
    meta["finished"] = utc_now()
    save()

    table = []
    for name, s in summary.items():
        if "error" in s:
            table.append([name, None, None, None, None, None, None, None, None, None, None,
                          f"setup failed: {s['error']}"])
            continue
        fl = s.get("sdpa_flash_tbps")
        tail = s.get("best") or "-"
        if "ragged_over_uniform_best" in s:
            tail += (f"  ragged/uniform time: best {s['ragged_over_uniform_best']:.2f}, "
                     f"default {s.get('ragged_over_uniform_default', float('nan')):.2f}")
        table.append([name, s["batch"], s["seq_q"], s["n_max"], s.get("default_tbps"), s.get("best_tbps"),
                      s.get("api_tbps"), fl, s.get("sdpa_cudnn_tbps"),
                      s["best_tbps"] / fl if fl and s.get("best_tbps") else None, s.get("target_tbps"), tail])
    print_table(["case", "B", "Nq", "Nmax", "dflt", "best", "api", "flash", "cuDNN", "b/fl", "target",
                 "best config / ragged÷uniform"], table,
                title=f"Decode, {dtype_name} D={head_dim} Hq={heads_q} Hkv={heads_kv}: effective TB/s "
                      "((K+V of live tokens + Q + O) / median time)")
    bad = {n: s["wrong_results"] for n, s in summary.items() if s.get("wrong_results")}
    if bad:
        print(f"\nWRONG RESULTS (never counted as best): {json.dumps(bad)}")
    print(f"\nwrote {out / 'decode_bench.csv'} and {out / 'decode_bench.json'}")
    return 1 if bad else 0


@dataclass
class BucketShape:
    name: str
    batch: int
    bucket: int  # the kv_bucket whose lengths are swept


def bucket_lengths(bucket: int, count: int) -> list[int]:
    """`count` lengths spread evenly in log2 from the bucket's first length to its last, and the bucket's own."""
    from flashtune.kernel.dispatch import kv_bucket

    lo = next(n for n in range(bucket // 2, bucket + 1) if kv_bucket(n) == bucket)
    hi = next(n for n in range(2 * bucket, bucket - 1, -1) if kv_bucket(n) == bucket)
    spread = {round(lo * (hi / lo) ** (i / max(1, count - 1))) for i in range(count)}
    return sorted(spread | {bucket})


def bucket_main(args: Any) -> int:
    """The --bucket check (see the module docstring)."""
    import torch

    from flashtune.db.types import Config, Key, bucket as bh_bucket
    from flashtune.kernel import dispatch
    from flashtune.kernel.checks import check_kvcache_inputs
    from flashtune.kernel.ops.kvcache import decode_config_for, launch_decode
    from flashtune.kernel.testing import attention_kvcache_reference
    from flashtune.tuner.gpu import detect_gpu, planned_gpu
    from flashtune.tuner.ops.kvcache import kvcache_space

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.db:
        dispatch.reload(args.db)
    if args.smoke:
        dtype, heads_q, heads_kv, head_dim, max_configs = torch.float16, 4, 2, 32, 3
        shapes = [BucketShape("b2_n64", 2, 64)]
        gpu = planned_gpu(dispatch.INTERPRETER_ARCH)
    else:
        dtype, heads_q, heads_kv, head_dim, max_configs = torch.bfloat16, 32, 8, 128, None
        shapes = [BucketShape("b1_n2k", 1, 2048), BucketShape("b8_n2k", 8, 2048), BucketShape("b8_n16k", 8, 16384)]
        gpu = detect_gpu()
    dtype_name = str(dtype).removeprefix("torch.")
    group, scale = heads_q // heads_kv, head_dim ** -0.5
    timer = Timer.from_args(args, device == "cuda")
    out = out_dir(args.out)
    meta: dict[str, Any] = dict(provenance(), dtype=dtype_name, heads_q=heads_q, heads_kv=heads_kv,
                                head_dim=head_dim, seq_q=1, smoke=args.smoke, db=args.db, rep_ms=args.rep)
    results: dict[str, Any] = {}
    wrong: list[str] = []

    for shape_case in shapes:
        lengths = bucket_lengths(shape_case.bucket, 3 if args.smoke else args.lengths)
        per_length: dict[int, dict[str, Any]] = {}
        timed: dict[int, dict[Config, float]] = {}
        inputs: dict[int, Any] = {}
        for n in lengths:  # every config of the exact length's space
            gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * shape_case.batch + n)
            q = torch.randn(shape_case.batch, heads_q, 1, head_dim, device=device, dtype=dtype, generator=gen)
            k, v = (torch.randn(shape_case.batch, heads_kv, n, head_dim, device=device, dtype=dtype, generator=gen)
                    for _ in range(2))
            shape = check_kvcache_inputs(q, k, v)
            ref = attention_kvcache_reference(q, k, v, dtype=torch.float32)
            key = Key(gpu.arch, "kvcache", 1, head_dim, dtype_name, False, seq_len_kv=n,
                      batch_heads=bh_bucket(shape_case.batch * heads_q), group=group)
            space = kvcache_space(key, gpu)[:max_configs]
            plan = dispatch.kvcache_plan(q, k, v, False, False)
            default = decode_config_for(shape, q.device)

            def run(config: Config, q: Any = q, k: Any = k, v: Any = v, shape: Any = shape) -> Any:
                return launch_decode(q, k, v, shape, cache_seqlens=None, causal=False, scale=scale, config=config)[0]

            def checked_ms(config: Config, ref: Any = ref, run: Any = run) -> float | None:
                try:
                    o = run(config)
                    err = float((o.float() - ref).norm() / ref.norm())
                    if not err <= BOUND[dtype_name]:
                        wrong.append(f"{shape_case.name} n={n} {config}: rel err {err:.2e}")
                        return None
                    return timer(lambda: run(config))
                except Exception as exc:  # noqa: BLE001 - a config that fails is reported, not fatal
                    print(f"  {shape_case.name} n={n} {config}: {error_line(exc, 200)}", flush=True)
                    return None

            times = {}
            for config in dict.fromkeys([default, plan.choice.config, *space]):
                ms = checked_ms(config)
                if ms is not None:
                    times[config] = ms
            timed[n], inputs[n] = times, (checked_ms, plan, default)
            per_length[n] = dict(space=len(space), pick=str(plan.choice.config), pick_source=plan.choice.source,
                                 default=str(default))
            print(f"[{shape_case.name}] n={n}: {len(times)} configs timed", flush=True)
            if device == "cuda":
                del q, k, v, ref
                torch.cuda.empty_cache()
        own = timed.get(shape_case.bucket) or {}
        winner = min(own, key=own.get) if own else None  # what tuning the bucket's own key would store
        rows = []
        for n in lengths:
            times = timed[n]
            checked_ms, plan, default = inputs[n]
            if winner is not None and winner not in times:
                ms = checked_ms(winner)  # the bucket winner is not in this length's space: time it here
                if ms is not None:
                    times[winner] = ms
            best = min(times, key=times.get) if times else None
            row = per_length[n]
            row.update(best=str(best) if best else None, best_ms=times.get(best) if best else None,
                       bucket_winner=str(winner) if winner else None, bucket_winner_ms=times.get(winner),
                       pick_ms=times.get(plan.choice.config), default_ms=times.get(default))
            for what in ("bucket_winner", "pick", "default"):
                row[f"{what}_over_best"] = (row[f"{what}_ms"] / row["best_ms"]
                                            if row.get(f"{what}_ms") and row.get("best_ms") else None)
            row["all_ms"] = {str(c): ms for c, ms in sorted(times.items(), key=lambda t: t[1])}
            rows.append(dict(n=n, **row))
        worst = max((r["bucket_winner_over_best"] or 0.0 for r in rows), default=None)
        results[shape_case.name] = dict(batch=shape_case.batch, bucket=shape_case.bucket, lengths=lengths,
                                        bucket_winner=str(winner) if winner else None,
                                        worst_bucket_winner_over_best=worst, rows=rows)
        write_json(out / "decode_bucket_bench.json", dict(meta=meta, shapes=results, wrong_results=wrong))

    meta["finished"] = utc_now()
    write_json(out / "decode_bucket_bench.json", dict(meta=meta, shapes=results, wrong_results=wrong))
    table = []
    for name, r in results.items():
        for row in r["rows"]:
            table.append([name, r["bucket"], row["n"], row["best_ms"], row["bucket_winner_over_best"],
                          row["pick_over_best"], row["default_over_best"],
                          f"best {row['best']}; bucket winner {row['bucket_winner']}; pick {row['pick']} "
                          f"({row['pick_source']})"])
    print_table(["shape", "bucket", "Nk", "best ms", "winner/best", "pick/best", "dflt/best", "configs"], table,
                title=f"Decode: one bucket's winner across its lengths, {dtype_name} D={head_dim} Hq={heads_q} "
                      f"Hkv={heads_kv} Nq=1 (time / the best of the length's kvcache space)")
    for name, r in results.items():
        print(f"{name}: worst bucket winner / best over the bucket {r['worst_bucket_winner_over_best'] or 0:.3f}")
    if wrong:
        print("\nWRONG RESULTS (never counted as best):\n  " + "\n  ".join(wrong))
    print(f"\nwrote {out / 'decode_bucket_bench.json'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
