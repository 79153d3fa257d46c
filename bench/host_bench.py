"""Host time per call on a CUDA GPU: `attention()` vs a raw Triton JIT launch vs torch SDPA.

The same tiny call (B=1, H=1, N=128, D=64, fp16 by default), where the GPU work is a few µs and the
host dominates, made `--calls` times back to back with no synchronisation inside the loop; host µs per
call = perf_counter around the loop, wall µs = to the final synchronize. Repeats are interleaved
(every way once per round) and medians reported. The ways:

- `attention()`: the public API, eager, under torch.no_grad (the dispatcher's plan, then the cached
  compiled kernel relaunched directly: kernel.fastlaunch);
- `attention() JIT path`: the same with the direct relaunch switched off (what it cost before);
- `raw JIT launch`: `kernel.ops.fwd.launch` with the same config and a preallocated output, i.e.
  `attn_fwd_kernel[grid](...)` and nothing else;
- `fast relaunch only`: the FastLaunch of the plan called by hand on a preallocated output;
- `torch SDPA`: F.scaled_dot_product_attention with torch's own backend choice, and pinned to flash.

Also checks that attention()'s output equals the raw launch's bitwise. Target: attention() <= SDPA.

Then a decode section: host µs per decode step against a growing dynamic cache (B=1, Hq=32, Hkv=8,
D=128, bf16 by default, Nq=1): the cache length starts at --kv-start (1024) and grows by one every
call, the caches being contiguous (B, Hkv, Nk, D) tensors as transformers' dynamic cache makes them
(views over one buffer with a contiguous tensor's strides for that Nk, so their strides change every
step too; nothing is copied in the loop). Each round walks the same --decode-calls lengths, crossing
bucket boundaries (1449, 2897); a first untimed round compiles what the lengths need. The ways:

- `attention_kvcache`: config=None, the dispatcher's bucketed plan and the relaunch of both passes;
- `attention_kvcache JIT path`: the same with the direct relaunch switched off;
- `transformers wrapper`: flashtune's transformers attention function called directly, as a model
  layer calls it (returns (B, 1, Hq, D)), if transformers is installed;
- `transformers SDPA function`: transformers' own sdpa_attention_forward, the same call;
- `torch SDPA`: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).

It checks that attention_kvcache's output equals the JIT path's bitwise and SDPA's within bf16
tolerance. Target: attention_kvcache and the wrapper <= SDPA's host time.

    python3 bench/host_bench.py --out bench/results/h200       # both sections
    python3 bench/host_bench.py --out bench/results/h200 --decode-only

Writes <out>/host_bench.json (the decode section under "decode"); the decode table is printed last.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from common import HostLoop, arguments, host_rounds, out_dir, print_table, provenance, require_gpu, write_json

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, out_help="directory for host_bench.json", seed=True,
                       timing=[HostLoop(calls=2000, repeats=15)])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="skip the forward section")
    parser.add_argument("--decode-calls", type=int, default=2000, help="decode steps per timed loop (Nk + 1 each)")
    parser.add_argument("--kv-start", type=int, default=1024, help="cache length of the first decode step")
    parser.add_argument("--decode-dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    require_gpu()
    out = out_dir(args.out)
    torch.set_grad_enabled(False)
    result = {**provenance(), **({} if args.decode_only else forward_section(args))}
    result["decode"] = decode_section(args)
    write_json(out / "host_bench.json", result)
    print(f"\nwrote {out / 'host_bench.json'}")
    if not args.decode_only:
        print_forward(result)
    print_decode(result["decode"], result)
    return 0


def _rows(ways: dict[str, Callable[[], Any]], calls: int, repeats: int) -> list[dict[str, Any]]:
    return [{"way": name, **stats} for name, stats in host_rounds(ways, calls, repeats).items()]


def _print_rows(rows: list[dict[str, Any]], unit: str) -> None:
    print_table(["way", f"host µs/{unit}", f"wall µs/{unit}", "host min"],
                [[r["way"], r["host_us"], r["wall_us"], r["host_us_min"]] for r in rows], markdown=True)


def forward_section(args: argparse.Namespace) -> dict[str, Any]:
    """The forward's tiny call: attention() vs the JIT path, a raw launch, the relaunch alone, SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtune.kernel import attention, dispatch, fastlaunch
    from flashtune.kernel.ops.fwd import launch

    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
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
        was, fastlaunch._state["disabled"] = fastlaunch._state["disabled"], True
        try:
            return attention(q, k, v, is_causal=causal)
        finally:
            fastlaunch._state["disabled"] = was

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

    rows = _rows(ways, args.calls, args.repeats)
    by = {r["way"]: r for r in rows}
    sdpa_best = min(by["torch SDPA (auto)"]["host_us"], by["torch SDPA (flash)"]["host_us"])
    sdpa_worst = max(by["torch SDPA (auto)"]["host_us"], by["torch SDPA (flash)"]["host_us"])
    return {
        "shape": {"batch": args.batch, "heads": args.heads, "seq": args.seq, "head_dim": args.head_dim,
                  "dtype": args.dtype, "causal": causal},
        "config": str(plan.kernel), "choice": str(plan.choice), "fast_path_active": fast_active,
        "outputs_bitwise_equal": equal, "calls": args.calls, "repeats": args.repeats,
        "rows": rows, "target": "attention() host us <= torch SDPA's in the same run",
        "target_met_vs_slower_sdpa": by["attention()"]["host_us"] <= sdpa_worst,
        "target_met_vs_faster_sdpa": by["attention()"]["host_us"] <= sdpa_best,
        "sdpa_host_us": [sdpa_best, sdpa_worst],
    }


def print_forward(result: dict[str, Any]) -> None:
    shape = result["shape"]
    print(f"\nforward: GPU {result['gpu']}, torch {result['torch']}, Triton {result['triton']}; shape "
          f"B={shape['batch']} H={shape['heads']} N={shape['seq']} D={shape['head_dim']} {shape['dtype']} "
          f"causal={shape['causal']}; config {result['config']}; fast path active: {result['fast_path_active']}; "
          f"attention() == raw launch bitwise: {result['outputs_bitwise_equal']}")
    print(f"{result['repeats']} interleaved rounds of {result['calls']} calls; medians")
    _print_rows(result["rows"], "call")
    api = next(r for r in result["rows"] if r["way"] == "attention()")["host_us"]
    best, worst = result["sdpa_host_us"]
    print(f"\ntarget attention() <= SDPA host time: {'MET' if result['target_met_vs_slower_sdpa'] else 'NOT MET'} "
          f"(attention() {api:.2f} µs, SDPA {best:.2f}–{worst:.2f} µs)")


class _DecodeLayer(torch.nn.Module):
    """What a transformers attention function reads of its layer: causal, and the GQA group."""

    is_causal = True

    def __init__(self, group: int) -> None:
        super().__init__()
        self.num_key_value_groups = group


def decode_section(args: argparse.Namespace) -> dict[str, Any]:
    """Host µs per decode step against a growing dynamic cache (see the module docstring)."""
    from flashtune.kernel import attention_kvcache, dispatch, fastlaunch

    b, hq, hkv, d = 1, 32, 8, 128
    dtype = DTYPES[args.decode_dtype]
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    lengths = range(args.kv_start, args.kv_start + args.decode_calls)
    top = lengths[-1]
    k_mem, v_mem = (torch.randn(b * hkv * top * d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    # Each step's caches: contiguous (B, Hkv, Nk, D) strides for its Nk, as torch.cat makes them.
    caches = [(k_mem.as_strided((b, hkv, n, d), (hkv * n * d, n * d, d, 1)),
               v_mem.as_strided((b, hkv, n, d), (hkv * n * d, n * d, d, 1))) for n in lengths]
    # q as a transformers layer makes it: (B, 1, Hq, D) projected, then transposed.
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    layer = _DecodeLayer(hq // hkv)
    scale = d ** -0.5

    def walk(fn: Callable[[Any, Any], Any]) -> Callable[[], Any]:
        def run() -> Any:
            out = None
            for k, v in caches:
                out = fn(k, v)
            return out
        return run

    def jit_path(k: Any, v: Any) -> Any:
        was, fastlaunch._state["disabled"] = fastlaunch._state["disabled"], True
        try:
            return attention_kvcache(q, k, v, causal=True)
        finally:
            fastlaunch._state["disabled"] = was

    ways: dict[str, Callable[[Any, Any], Any]] = {
        "attention_kvcache": lambda k, v: attention_kvcache(q, k, v, causal=True),
        "attention_kvcache JIT path": jit_path,
    }
    wrapper_note = None
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from flashtune.kernel.integrations.transformers import tuned_attention_forward

        ways["transformers wrapper"] = lambda k, v: tuned_attention_forward(layer, q, k, v, None, scaling=scale)[0]
        ways["transformers SDPA function"] = (
            lambda k, v: sdpa_attention_forward(layer, q, k, v, None, scaling=scale)[0])
    except ImportError as error:
        wrapper_note = f"transformers not importable: {error}"
    ways["torch SDPA"] = lambda k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for fn in ways.values():  # compile what the lengths need, fill plans and launchers
        walk(fn)()
    torch.cuda.synchronize()
    k0, v0 = caches[len(caches) // 2]
    got = attention_kvcache(q, k0, v0, causal=True)
    equal = bool(torch.equal(got, jit_path(k0, v0)))
    sdpa_out = F.scaled_dot_product_attention(q, k0, v0, enable_gqa=True)
    error = float((got.double() - sdpa_out.double()).norm() / sdpa_out.double().norm())
    plan = dispatch.kvcache_plan(q, k0, v0, True, False)
    buckets = sorted({dispatch.kv_bucket(n) for n in lengths})
    launchers = {str(dispatch.kv_bucket(n)): len(dispatch.kvcache_plan(q, *caches[n - args.kv_start], True,
                                                                         False).launch.launchers)
                 for n in (lengths[0], lengths[-1])}

    rows = _rows({name: walk(fn) for name, fn in ways.items()}, 1, args.repeats)
    for r in rows:  # per step, not per walk
        for field in ("host_us", "wall_us", "host_us_min"):
            r[field] /= len(caches)
    by = {r["way"]: r["host_us"] for r in rows}
    sdpa = by["torch SDPA"]
    return {
        "shape": {"batch": b, "heads_q": hq, "heads_kv": hkv, "head_dim": d, "seq_q": 1, "dtype": args.decode_dtype,
                  "kv_start": args.kv_start, "kv_end": top, "buckets": buckets},
        "config": str(plan.choice.config), "choice": str(plan.choice), "calls": len(caches), "repeats": args.repeats,
        "fast_path_active": not fastlaunch.disabled(), "launchers_per_plan": launchers,
        "outputs_bitwise_equal_jit": equal, "rel_error_vs_sdpa": error, "note": wrapper_note, "rows": rows,
        "target": "attention_kvcache and the transformers wrapper host us/step <= torch SDPA's in the same run",
        "target_met_kvcache": by["attention_kvcache"] <= sdpa,
        "target_met_wrapper": by["transformers wrapper"] <= sdpa if "transformers wrapper" in by else None,
    }


def print_decode(result: dict[str, Any], where: dict[str, Any]) -> None:
    shape = result["shape"]
    print(f"\ndecode: GPU {where['gpu']}, torch {where['torch']}, Triton {where['triton']}; B={shape['batch']} "
          f"Hq={shape['heads_q']} Hkv={shape['heads_kv']} D={shape['head_dim']} Nq=1 {shape['dtype']}, Nk "
          f"{shape['kv_start']}..{shape['kv_end']} (+1 per call; buckets {shape['buckets']}); config "
          f"{result['config']} ({result['choice']})")
    print(f"fast path active: {result['fast_path_active']}; launchers per plan {result['launchers_per_plan']}; "
          f"== JIT path bitwise: {result['outputs_bitwise_equal_jit']}; rel. error vs SDPA "
          f"{result['rel_error_vs_sdpa']:.2e}" + (f"; {result['note']}" if result["note"] else ""))
    print(f"{result['repeats']} interleaved rounds of {result['calls']} steps; medians; µs per step")
    _print_rows(result["rows"], "step")
    by = {r["way"]: r["host_us"] for r in result["rows"]}
    sdpa = by["torch SDPA"]
    verdict = ", ".join(f"{way} {by[way]:.2f} µs ({by[way] / sdpa:.2f}x)"
                        for way in ("attention_kvcache", "transformers wrapper") if way in by)
    met = result["target_met_kvcache"] and result["target_met_wrapper"] is not False
    print(f"\ntarget <= SDPA host time per step: {'MET' if met else 'NOT MET'} ({verdict}; SDPA {sdpa:.2f} µs)")


if __name__ == "__main__":
    sys.exit(main())
