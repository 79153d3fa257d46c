"""FP8 (e4m3) forward vs the bf16 forward and torch SDPA (cuDNN, flash) in bf16, one process, D=128.

Shapes (H=16 unless said): N=4096 B=8, N=8192 B=4, N=16384 B=2, and the target shape N=16384 B=4 H=32; causal
and not (--quick: N=4096 B=8 and the target shape). Inputs: N(0, 1) draws quantised to float8_e4m3fn with one
power-of-two descale per tensor (kernel.testing.quantize_fp8); the bf16 rows run on the dequantised values
(exact in bf16), so every row computes the same attention.

Rows per shape:
- fp8 m{M}-n{N}-w8-s{S}: the pointer kernel's fp8 path (kernel.ops.fwd.launch) with a few configs (block_m 128,
  block_n 64/128, 8 warps, 2-4 stages), V passed key-contiguous (kernel.ops.fwd.fp8_value_layout, done once
  outside the timing): the kernel alone. The TMA kernel has no fp8 path.
- fp8 {config} V as given: the same kernel launched on V in the usual (B, H, N, D) layout, for the first config
  only: Triton then stages V through registers into a transposed shared tile itself (no async copy pipeline
  for V), which the relayout avoids; this row says what that costs.
- fp8 attention(): the public call as dispatched, V in the usual layout: the kernel plus the V relayout copy.
- bf16 attention(): flashtune's bf16 forward as dispatched; sdpa_cudnn / sdpa_flash: torch SDPA pinned, bf16.
Each fp8 row is first run on a NaN-poisoned output and checked against the SDPA bf16 output on the same
dequantised values: relative Frobenius error at most 0.125 (the tuner's fp8 tolerance, tuner/ops/fwd.py), else
WRONG and exit status 1. TFLOP/s = 4·B·H·N²·D, half when causal; times are triton.testing.do_bench medians.
Target: >= 900 TFLOP/s fp8 at N=16384 on an H100.

Writes <out>/fp8_bench.json and prints the table last.

    python bench/fp8_bench.py --out bench/results/h100/fp8            # GPU, ~2-4 minutes
    python bench/fp8_bench.py --out /tmp/fp8 --quick                  # GPU, ~1 minute
    TRITON_INTERPRET=1 python bench/fp8_bench.py --smoke --out /tmp/fp8-smoke   # CPU: tiny shapes, fp16 out
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from common import Budget, Timer, arguments, error_line, out_dir, print_table, provenance, require_gpu, \
    use_interpreter, write_json

FP8_TOLERANCE = 0.125  # tuner.ops.fwd.TOLERANCE["float8_e4m3fn"], derived there
CONFIGS = ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3))
SHAPES = ((8, 16, 4096), (4, 16, 8192), (2, 16, 16384), (4, 32, 16384))  # (B, H, N)
QUICK = ((8, 16, 4096), (4, 32, 16384))
SMOKE = ((1, 2, 64),)
SMOKE_CONFIGS = ((32, 32, 4, 1), (64, 64, 4, 1))


def main() -> int:
    parser = arguments(__doc__, smoke="tiny shapes under the Triton interpreter (CPU)", timing=[Budget(10, 100)])
    parser.add_argument("--quick", action="store_true", help="two shapes: N=4096 B=8 and N=16384 B=4 H=32")
    args = parser.parse_args()
    require_gpu(unless=args.smoke, hint="run with --smoke (tiny shapes under the Triton interpreter)")
    use_interpreter(args.smoke)  # before the kernels are imported

    import torch

    from flashtune.db.types import Config
    from flashtune.kernel import attention
    from flashtune.kernel.dispatch import explain
    from flashtune.kernel.fp8 import check_fp8
    from flashtune.kernel.jit.fwd import attn_fwd_kernel
    from flashtune.kernel.ops.fwd import _fwd_arguments, fp8_value_layout, launch
    from flashtune.kernel.sdpa import run_sdpa
    from flashtune.kernel.testing import attention_flops, quantize_fp8, tflops

    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    out_dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 is not to be trusted
    ref_dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer.from_args(args, cuda=cuda)
    shapes = SMOKE if args.smoke else QUICK if args.quick else SHAPES
    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    folder = out_dir(args.out)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    wrong = False

    def record(shape: tuple[int, int, int], causal: bool, name: str, fn: Callable[[], Any] | None,
               error: str | None = None, err: float | None = None) -> None:
        b, h, n = shape
        row: dict[str, Any] = {"B": b, "H": h, "N": n, "causal": causal, "row": name, "error": error, "rel_err": err}
        if fn is not None and error is None:
            try:
                ms = timer(fn)
                row.update(ms=ms, tflops=tflops(attention_flops(b * h, n, n, 128, causal), ms))
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, the run goes on
                row["error"] = error_line(exc)
        rows.append(row)
        shown = f"{row.get('tflops', 0):.0f} TFLOP/s" if "tflops" in row else row["error"]
        print(f"B={b} H={h} N={n} {'causal' if causal else 'full'} {name}: {shown}", flush=True)

    def bench_shape(b: int, h: int, n: int) -> bool:
        """Every row of one shape, both masks; whether an fp8 output was wrong."""
        bad_any = False
        gen = torch.Generator(device="cpu").manual_seed(b * 7 + n)
        drawn = [torch.randn(b, h, n, 128, generator=gen).to(device) for _ in range(3)]
        (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(x) for x in drawn)
        del drawn
        q, k, v = (x.to(ref_dtype) * d.to(ref_dtype) for x, d in ((q8, qd), (k8, kd), (v8, vd)))
        v8t = fp8_value_layout(v8)
        shape, scales = check_fp8(q8, k8, v8, qd, kd, vd, out_dtype)

        def checked(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, str | None]:
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            return err, None if err <= FP8_TOLERANCE else f"WRONG: relative error {err:.3g}"

        for causal in (False, True):
            ref = run_sdpa("sdpa_flash", q, k, v, causal=causal) if cuda else \
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            for bm, bn, w, s in configs:
                config = Config(bm, bn, w, s)
                name = f"fp8 {config}"
                out = torch.full(q8.shape, math.nan, dtype=out_dtype, device=device)

                def run(c: Config = config, o: torch.Tensor = out, causal: bool = causal) -> Any:
                    return launch(q8, k8, v8t, shape, causal=causal, scale=128 ** -0.5, config=c, out=o, fp8=scales)

                try:
                    run()
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row
                    record((b, h, n), causal, name, None, error_line(exc))
                    continue
                err, problem = checked(out, ref)
                bad_any |= problem is not None
                record((b, h, n), causal, name, run, problem, err)
                if config == Config(*configs[0]):
                    # V as given: the kernel launched without the relayout that launch() does first.
                    grid, pos, kw = _fwd_arguments(q8, k8, v8, out, out, shape, causal, 128 ** -0.5, config, False,
                                                   "ieee", {}, fp8=scales)
                    out.fill_(math.nan)
                    attn_fwd_kernel[grid](*pos, **kw)
                    err, problem = checked(out, ref)
                    bad_any |= problem is not None
                    record((b, h, n), causal, f"{name} V as given",
                           lambda g=grid, p=pos, k_=kw: attn_fwd_kernel[g](*p, **k_), problem, err)

            def public(causal: bool = causal) -> torch.Tensor:
                return attention(q8, k8, v8, is_causal=causal, q_descale=qd, k_descale=kd, v_descale=vd,
                                 out_dtype=out_dtype)

            err, problem = checked(public(), ref)
            bad_any |= problem is not None
            ran = explain(q8, k8, v8, is_causal=causal).config
            record((b, h, n), causal, f"fp8 attention() [{ran}]", public, problem, err)
            record((b, h, n), causal, f"{'bf16' if cuda else 'fp32'} attention()",
                   lambda causal=causal: attention(q, k, v, is_causal=causal))
            if cuda:
                for provider in ("sdpa_cudnn", "sdpa_flash"):
                    try:
                        run_sdpa(provider, q, k, v, causal=causal)
                    except RuntimeError as exc:
                        record((b, h, n), causal, f"{provider} bf16", None, error_line(exc))
                        continue
                    record((b, h, n), causal, f"{provider} bf16",
                           lambda p=provider, causal=causal: run_sdpa(p, q, k, v, causal=causal))
        return bad_any

    for b, h, n in shapes:
        wrong |= bench_shape(b, h, n)
        if cuda:
            torch.cuda.empty_cache()
        write_json(folder / "fp8_bench.json", {"meta": provenance(), "rows": rows})

    elapsed = time.perf_counter() - started
    write_json(folder / "fp8_bench.json", {"meta": dict(provenance(), seconds=round(elapsed, 1)), "rows": rows})
    table = [(r["B"], r["H"], r["N"], "causal" if r["causal"] else "full", r["row"], r.get("ms"), r.get("tflops"),
              r["rel_err"], r["error"] or "") for r in rows]
    print_table(("B", "H", "N", "mask", "row", "ms", "TFLOP/s", "rel err", "note"), table,
                title=f"fp8 forward, D=128 ({elapsed:.0f} s); fp8 rows: the kernel alone unless attention()")
    best = [r for r in rows if r["row"].startswith("fp8 m") and r["N"] == 16384 and "tflops" in r]
    if best:
        top = max(best, key=lambda r: r["tflops"])
        print(f"\nbest fp8 at N=16384: {top['tflops']:.0f} TFLOP/s ({top['row']}, B={top['B']} H={top['H']}, "
              f"{'causal' if top['causal'] else 'full'}); target 900")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
